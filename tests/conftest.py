"""Shared fixtures: a tiny random SAM saved as a .pth, a toy raw dataset in fresh tree roots, and the toy
runs several test files use, built once per session (an embedding cache, a trained fold, model folders)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

if "PYTEST_XDIST_WORKER" in os.environ:  # `make test -n 2`: one thread per worker (and its subprocesses), set
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, so 2 workers fill 2 cores

sys.path.insert(0, str(Path(__file__).parent))

from desam_pipeline.network.sam_models import ensure_tiny_checkpoint  # noqa: E402
from plans.plan_and_embed import plan_and_embed  # noqa: E402

from toy_data import write_toy_dataset  # noqa: E402
from toy_runs import DATASET, SHAPE, fold_dir, run_cli, write_model_folder  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The seeded random tiny SAM, saved to and loaded from a .pth like the official files."""
    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("sam") / "sam_tiny.pth")


@pytest.fixture
def trees(tmp_path, monkeypatch) -> dict[str, Path]:
    """Empty raw/preprocessed/results roots, exported as the three DESAM_* variables."""
    roots = {k: tmp_path / k for k in ("raw", "preprocessed", "results")}
    for kind, path in roots.items():
        path.mkdir()
        monkeypatch.setenv(f"DESAM_{kind.upper()}", str(path))
    return roots


@pytest.fixture
def toy_dataset(trees) -> Path:
    """Dataset900_Toy: two sites, two cases each, 40x36x8 volumes, in the raw root."""
    return write_toy_dataset(trees["raw"])


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory, tiny_checkpoint) -> Path:
    """A root with raw/ (the toy dataset, 6-slice volumes) and pre/ (SiteA embedded with the tiny SAM,
    foreground slices only). Tests write their results into their own folders under the root."""
    root = tmp_path_factory.mktemp("train")
    write_toy_dataset(root / "raw", shape=SHAPE)
    plan_and_embed("900", encoder="tiny", checkpoint=str(tiny_checkpoint), domains=["SiteA"],
                   slices="foreground", raw=str(root / "raw"), preprocessed=str(root / "pre"))
    return root


@pytest.fixture(scope="session")
def trained_fold(toy_cache) -> Path:
    """fold_0 of an uninterrupted 2-epoch box run on `toy_cache` (toy_runs.COMMON), loading in the training
    process; tests read it and put back what they change."""
    assert run_cli(toy_cache, "results", "--num-workers", "0") == 0
    return fold_dir(toy_cache, "results")


@pytest.fixture(scope="session")
def predict_env(tmp_path_factory, tiny_checkpoint) -> SimpleNamespace:
    """Toy dataset (6-slice volumes, one case per site), SiteA's foreground slices cached, untrained box
    (folds 0 and 1) and grid (fold 0) model folders; `roots` are the flags that point desam_predict at them."""
    root = tmp_path_factory.mktemp("predict")
    raw, pre, res = (root / k for k in ("raw", "preprocessed", "results"))
    write_toy_dataset(raw, cases_per_site=1, shape=SHAPE)
    plan_and_embed(DATASET, encoder="tiny", checkpoint=str(tiny_checkpoint), domains=["SiteA"],
                   slices="foreground", device="cpu", raw=str(raw), preprocessed=str(pre))
    return SimpleNamespace(
        raw=raw / DATASET, pre=pre, res=res, checkpoint=tiny_checkpoint,
        box=write_model_folder(res, pre, tiny_checkpoint, "box", [0, 1]),
        grid=write_model_folder(res, pre, tiny_checkpoint, "grid", [0]),
        roots=["--preprocessed", str(pre), "--results", str(res)])
