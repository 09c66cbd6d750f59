"""Shared fixtures: a tiny random SAM saved as a .pth, and a toy raw dataset."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from desam_pipeline.network.sam_models import ensure_tiny_checkpoint  # noqa: E402

from toy_data import write_toy_dataset  # noqa: E402


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
