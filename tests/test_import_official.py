"""desam_import_official: a model saved as the reference scripts save it becomes a desam model folder that
computes exactly what the reference's forward pass computes, and desam_predict runs on it."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from desam_pipeline.baselines import import_official
from desam_pipeline.inference import predict
from desam_pipeline.inference.model import load_model
from desam_pipeline.io.atomic import read_json
from desam_pipeline.io.nifti_io import file_sha256
from desam_pipeline.io.results_layout import IMPORT_RECORD, Checkpoint
from desam_pipeline.network.sam_models import build_sam
from evaluation import evaluate, report
from plans.plan_and_embed import plan_and_embed

from reference_layout import ReferenceSam
from toy_data import TINY_TAPS, write_toy_dataset


DATASET = "Dataset900_Toy"
FOLDER = "DeSAMOfficial__DeSAMPlans_tiny__{mode}__src-SiteA"


def reference_model(tiny_checkpoint: Path) -> ReferenceSam:
    """The tiny SAM with the reference's PDMM, its decoder moved away from SAM's as training would."""
    sam = build_sam("tiny")
    sam.load_state_dict(torch.load(tiny_checkpoint, weights_only=True))
    torch.manual_seed(7)
    model = ReferenceSam(sam, TINY_TAPS[0][0])
    with torch.no_grad():
        for name, param in model.mask_decoder.named_parameters():
            if not name.startswith("pimm."):
                param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("import")
    raw, pre, res = (root / k for k in ("raw", "preprocessed", "results"))
    write_toy_dataset(raw, cases_per_site=1, shape=(40, 36, 4))
    plan_and_embed(DATASET, encoder="tiny", checkpoint=str(tiny_checkpoint), domains=["SiteA"],
                   slices="foreground", device="cpu", raw=str(raw), preprocessed=str(pre))
    model = reference_model(tiny_checkpoint)
    saved = root / "desam_model_best.pth"
    torch.save(model.state_dict(), saved)  # as desam_train_gridpoints.py / desam_train_wholebox.py save
    return SimpleNamespace(root=root, raw=raw / DATASET, pre=pre, res=res, model=model, saved=saved,
                           state=model.state_dict(), roots=["--preprocessed", str(pre), "--results", str(res)])


def run_import(env, checkpoint: Path, *args) -> int:
    with pytest.raises(SystemExit) as stop:
        import_official.main([str(checkpoint), "-d", "900", "--source", "SiteA", *args, *env.roots])
    return stop.value.code


@pytest.mark.slow
def test_imported_model_computes_the_reference_forward(env, capsys):
    assert run_import(env, env.saved, "--mode", "grid") == 0
    folder = env.res / DATASET / FOLDER.format(mode="grid")
    assert [p.name for p in folder.glob("fold_*")] == ["fold_all"]
    assert {"plans.json", "dataset.json", "dataset_fingerprint.json"} <= {p.name for p in folder.iterdir()}
    record = read_json(folder / "fold_all" / IMPORT_RECORD)
    assert record["sha256"] == file_sha256(env.saved) and record["image_encoder_checked"] is True
    assert record["imported_from"] == str(env.saved.resolve()) and record["pdmm"] == "reference"
    # Explained, not used: the image encoder, SAM's two mask heads, the deep-supervision head and the
    # residual 1x1 convolutions of the three blocks whose channels do not change.
    unused = record["unused_keys"]
    encoder_keys = sum(k.startswith("image_encoder.") for k in env.state)
    assert sum(v for k, v in unused.items() if "image encoder" in k) == encoder_keys
    assert unused["the first up-block's head, returned only with deep supervision (off in the scripts)"] == 1
    assert sum(v for k, v in unused.items() if "residual" in k) == 3
    checkpoint = Checkpoint.load(folder / "fold_all" / "checkpoint_final.pth")
    assert checkpoint.network_config["pdmm"] == "reference" and checkpoint.network_config["mode"] == "grid"
    assert not checkpoint.has_training_state and checkpoint.config["imported"]["sha256"] == record["sha256"]

    model = load_model(folder, ["all"], "cpu")
    net = model.networks[0]
    assert model.mode == "grid" and net.config["pdmm"] == "reference"
    torch.manual_seed(3)
    neck = torch.randn(2, 256, 64, 64)
    taps = [torch.randn(2, *shape) for shape in TINY_TAPS]
    points = (torch.tensor([[[300.0, 500.0]], [[800.0, 90.0]]]), torch.ones(2, 1, dtype=torch.int64))
    boxes = torch.tensor([[0.0, 0, 1024, 1024]] * 2)
    with torch.no_grad():
        for prompt in ({"points": points}, {"boxes": boxes}):
            ours, theirs = net(neck, taps, **prompt), env.model(neck, taps, **prompt)
            for a, b in zip(ours, theirs):
                assert a.shape == b.shape and b.std() > 0
                assert torch.equal(a, b)  # the same operations on the same weights: bit for bit


@pytest.mark.slow
def test_desam_predict_runs_on_the_imported_folder(env, tmp_path):
    assert run_import(env, env.saved, "--mode", "box") == 0
    folder = env.res / DATASET / FOLDER.format(mode="box")
    image = sorted((env.raw / "imagesTr").glob("*_0000.nii.gz"))[0]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        predict.main(["-i", str(image), "-o", str(out), "-m", str(folder), "--save-probabilities", *env.roots])
    assert stop.value.code == 0
    case = image.name[:-len("_0000.nii.gz")]
    mask = nib.load(str(out / f"{case}.nii.gz"))
    assert mask.shape == nib.load(str(image)).shape
    probabilities = np.load(out / f"{case}.npz")["probabilities"]
    assert probabilities.std() > 0  # the imported weights, not a constant
    assert read_json(out / "prediction.json")["folds"] == ["all"]
    for main, argv in ((evaluate.main, ["-d", "900", "--source", "SiteA", "--mode", "box", "-tr", "DeSAMOfficial",
                                        "--raw", str(env.raw.parent), *env.roots]),
                       (report.main, ["-d", "900", "--mode", "box", "-tr", "DeSAMOfficial",
                                      "--results", str(env.res)])):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 0
    per_case = pd.read_csv(folder / "evaluation" / "full" / "per_case.csv")
    assert "SiteB" in set(per_case["site"]) and per_case["dice"].notna().any()
    assert (env.res / DATASET / "report" / "DeSAMOfficial__box__full" / "report.md").is_file()


def _saved(env, state: dict, name: str) -> Path:
    path = env.root / name
    torch.save(state, path)
    return path


@pytest.mark.slow
def test_every_key_is_used_or_explained_and_errors_are_one_line(env, capsys):
    extra = _saved(env, {**env.state, "mask_decoder.pimm.extra.weight": torch.zeros(1)}, "extra.pth")
    assert run_import(env, extra, "--mode", "grid", "--fold", "1") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "key mask_decoder.pimm.extra.weight is neither" in err
    key = "mask_decoder.pimm.conv_blocks_context.2.residual_block.1.1.se.fc.0.weight"
    missing = _saved(env, {k: v for k, v in env.state.items() if k != key}, "missing.pth")
    assert run_import(env, missing, "--mode", "grid", "--fold", "1") == 1
    assert f"1 missing; first: {key}" in capsys.readouterr().err
    used_conv3 = "mask_decoder.pimm.mask_embedding_fusion.conv3.conv.weight"  # 512 -> 256: in the forward pass
    dropped = _saved(env, {k: v for k, v in env.state.items() if k != used_conv3}, "dropped.pth")
    assert run_import(env, dropped, "--mode", "grid", "--fold", "1") == 1
    assert used_conv3 in capsys.readouterr().err
    other_encoder = dict(env.state)
    other_encoder["image_encoder.neck.0.weight"] = other_encoder["image_encoder.neck.0.weight"] + 1
    other = _saved(env, other_encoder, "other.pth")
    assert run_import(env, other, "--mode", "grid", "--fold", "1") == 1
    assert "not the plan's SAM checkpoint" in capsys.readouterr().err
    assert not (env.res / DATASET / FOLDER.format(mode="grid") / "fold_1").exists()  # nothing half-written
    assert run_import(env, env.saved, "--mode", "grid", "--fold", "2") == 0
    assert run_import(env, env.saved, "--mode", "grid", "--fold", "2") == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert run_import(env, env.saved, "--mode", "grid", "--fold", "2", "--overwrite") == 0
