"""desam_predict on untrained tiny-SAM model folders: geometry, folds, modes, cache reuse, resume, shards, bad cases."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from desam_pipeline.data.orientation import from_slices, in_plane_shape, plan_orientation
from desam_pipeline.data.preprocessing import from_frame, preprocess_volume, slice_frame
from desam_pipeline.inference import predict, predictor, slice_prediction
from desam_pipeline.inference.features import SliceEncoder
from desam_pipeline.inference.inputs import CaseInput, discover_inputs, read_case_volume
from desam_pipeline.inference.model import load_model
from desam_pipeline.inference.outputs import QUALITY_COLUMNS
from desam_pipeline.inference.settings import PredictionSettings
from desam_pipeline.io.atomic import read_json
from desam_pipeline.io.results_layout import CHECKPOINT_BEST, CHECKPOINT_FINAL, Checkpoint, find_model_folder, \
    model_folder_name
from desam_pipeline.network.sam_models import build_sam, save_sam_checkpoint
from desam_pipeline.utilities.errors import DesamError

from toy_data import toy_volume
from toy_runs import DATASET

CPU = torch.device("cpu")


def run_cli(*args) -> int:
    with pytest.raises(SystemExit) as stop:
        predict.main([str(a) for a in args])
    return stop.value.code


def write_volume(path: Path, shape, affine, seed: int = 0, dtype=np.float32, qform_code: int = 1,
                 sform_code: int = 2) -> nib.Nifti1Image:
    image, _ = toy_volume(np.random.default_rng(seed), shape, empty_slices=0)
    img = nib.Nifti1Image(image.astype(dtype), affine)
    img.set_qform(affine, code=qform_code)
    img.set_sform(affine, code=sform_code)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return img


def oblique_affine(spacing, degrees: float = 30.0, shift=(-12.5, 40.0, 7.25)) -> np.ndarray:
    a = np.deg2rad(degrees)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(a / 2), -np.sin(a / 2)], [0, np.sin(a / 2), np.cos(a / 2)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ tilt @ np.diag(spacing)
    affine[:3, 3] = shift
    return affine


def quality(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "quality.csv", dtype={"case": str})


def manual_prediction(predict_env, folder: Path, folds: list[str], path: Path,
                      settings: PredictionSettings = PredictionSettings()):
    """Per-fold probabilities by hand (same encoder features, slice_prediction.predict_slices), and their average."""
    model = load_model(folder, folds, CPU)
    run = predictor.resolve_run(model.plan, settings, CPU)
    volume, _ = read_case_volume(CaseInput("x", (path,)))
    encoder = SliceEncoder(model.plan, predict_env.checkpoint, CPU, run.precision)
    neck, taps = encoder(preprocess_volume(volume, model.plan), "x")
    per_fold = [slice_prediction.predict_slices(net, neck, taps, model.mode, settings, device=CPU,
                                                precision=run.precision) for net in model.networks]
    return volume, per_fold


@pytest.mark.slow
def test_geometry_is_kept_exactly(predict_env, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    oblique = write_volume(inputs / "oblique_0000.nii.gz", (40, 28, 3), oblique_affine((0.7, 1.3, 3.5)))
    flipped = np.diag([-1.1, 0.45, 5.0, 1.0])
    flipped[:3, 3] = (20.0, -8.0, 3.0)
    anisotropic = write_volume(inputs / "aniso_0000.nii.gz", (33, 44, 2), flipped, seed=1, dtype=np.int16,
                               qform_code=2, sform_code=1)
    code = run_cli("-i", inputs, "-o", out, "-m", predict_env.box, "-f", "0", "--save-probabilities",
                   "--postprocess", "none", *predict_env.roots)
    assert code == 0
    for case, reference in (("oblique", oblique), ("aniso", anisotropic)):
        result = nib.load(str(out / f"{case}.nii.gz"))
        data = np.asanyarray(result.dataobj)
        assert data.shape == reference.shape and data.dtype == np.uint8
        assert result.get_data_dtype() == np.uint8
        assert set(np.unique(data)) <= {0, 1}
        assert np.array_equal(result.affine, reference.affine)
        assert np.allclose(result.get_qform(), reference.get_qform(), atol=1e-6)
        assert np.array_equal(result.get_sform(), reference.get_sform())
        for key in ("qform_code", "sform_code"):
            assert int(result.header[key]) == int(reference.header[key])
        assert result.header.get_zooms() == reference.header.get_zooms()
        assert nib.aff2axcodes(result.affine) == nib.aff2axcodes(reference.affine)
        probabilities = np.load(out / f"{case}.npz")["probabilities"]
        assert probabilities.shape == reference.shape
        assert np.array_equal(data, (probabilities > 0.5).astype(np.uint8))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_every_fold_is_used_and_their_probabilities_averaged(predict_env, tmp_path):
    path = tmp_path / "in" / "case_0000.nii.gz"
    write_volume(path, (40, 36, 3), np.diag([0.8, 0.8, 3.0, 1.0]), seed=2)
    out = tmp_path / "out"
    # No -f: every fold with a final checkpoint (0 and 1) is used.
    assert run_cli("-i", path, "-o", out, "-m", predict_env.box, "--save-probabilities", *predict_env.roots) == 0
    volume, per_fold = manual_prediction(predict_env, predict_env.box, ["0", "1"], path)
    (p0, q0), (p1, q1) = per_fold
    average = (p0 + p1) / 2
    assert not np.allclose(average, p0, atol=1e-3) and not np.allclose(average, p1, atol=1e-3)
    orientation = plan_orientation(load_model(predict_env.box, ["0"], CPU).plan)
    expected = from_slices(from_frame(average, slice_frame((256, 256), (1.0, 1.0), None),
                                      in_plane_shape(volume.shape, 2, orientation)), 2,
                           orientation)
    saved = np.load(out / "case.npz")["probabilities"]
    assert np.allclose(saved, expected, atol=1e-5)
    mask = np.asanyarray(nib.load(str(out / "case.nii.gz")).dataobj)
    assert np.array_equal(mask, (expected > 0.5).astype(np.uint8))
    table = quality(out)
    assert list(table.columns) == QUALITY_COLUMNS
    assert table["slice"].tolist() == [0, 1, 2] and set(table["case"]) == {"case"}
    assert np.allclose(table["predicted_iou"], (q0 + q1) / 2, atol=2e-6)
    assert np.allclose(table["case_mean_iou"], np.mean((q0 + q1) / 2), atol=2e-6)


@pytest.mark.slow
def test_grid_threshold_empties_slices_and_records_the_rule_and_d_finds_the_model(predict_env, tmp_path):
    path = tmp_path / "in" / "g_0000.nii.gz"
    write_volume(path, (40, 36, 2), np.diag([0.8, 0.8, 3.0, 1.0]), seed=3)
    outs = {}
    for threshold in ("-1", "2"):
        outs[threshold] = tmp_path / f"grid{threshold}"
        assert run_cli("-i", path, "-o", outs[threshold], "-d", "900", "--mode", "grid", "--grid", "2",
                       "--grid-rule", "top1", "--iou-threshold", threshold, "--save-probabilities", *predict_env.roots) == 0
    accepted = np.load(outs["-1"] / "g.npz")["probabilities"]
    rejected = np.load(outs["2"] / "g.npz")["probabilities"]
    assert (accepted > 0).all() and not rejected.any()
    assert not np.asanyarray(nib.load(str(outs["2"] / "g.nii.gz")).dataobj).any()
    _, [(_, iou)] = manual_prediction(predict_env, predict_env.grid, ["0"], path,
                                      PredictionSettings(grid=2, iou_threshold=-1, grid_rule="top1"))
    for out in outs.values():
        assert np.allclose(quality(out)["predicted_iou"], iou, atol=2e-6)
    reference = tmp_path / "reference"
    assert run_cli("-i", path, "-o", reference, "-d", "900", "--mode", "grid", "--grid", "2",
                   "--iou-threshold", "-1", "--save-probabilities", *predict_env.roots) == 0  # the default rule
    record = read_json(reference / "prediction.json")
    assert record["grid_rule"] == "reference" and record["grid"] == 2 and record["iou_threshold"] == -1
    assert record["encoder_runtime"] == "torch"  # the tiny ViT; LiteMedSAM in fp32 on CPU gets onnxruntime
    assert read_json(outs["-1"] / "prediction.json")["grid_rule"] == "top1"
    assert np.load(reference / "g.npz")["probabilities"].shape == (40, 36, 2)
    box_out = tmp_path / "box"
    assert run_cli("-i", path, "-o", box_out, "-d", "900", "--mode", "box", "-f", "1", *predict_env.roots) == 0
    assert nib.load(str(box_out / "g.nii.gz")).shape == (40, 36, 2)


@pytest.mark.slow
def test_checkpoint_name_chooses_and_records_the_checkpoint(predict_env, tmp_path):
    """fold 0's `best` checkpoint is fold 1's weights here: --checkpoint-name best -f 0 must predict what
    fold 1's final checkpoint predicts, and prediction.json says which checkpoint was used."""
    path = tmp_path / "in" / "c_0000.nii.gz"
    write_volume(path, (40, 36, 2), np.diag([0.8, 0.8, 3.0, 1.0]), seed=4)
    best = predict_env.box / "fold_0" / CHECKPOINT_BEST
    shutil.copyfile(predict_env.box / "fold_1" / CHECKPOINT_FINAL, best)
    try:
        outs = {name: tmp_path / name for name in ("final0", "best0", "final1")}
        for name, fold, checkpoint in (("final0", "0", "final"), ("best0", "0", "best"), ("final1", "1", "final")):
            assert run_cli("-i", path, "-o", outs[name], "-m", predict_env.box, "-f", fold, "--checkpoint-name", checkpoint,
                           "--save-probabilities", *predict_env.roots) == 0
        saved = {name: np.load(out / "c.npz")["probabilities"] for name, out in outs.items()}
        assert np.array_equal(saved["best0"], saved["final1"])
        assert not np.allclose(saved["best0"], saved["final0"], atol=1e-3)
        records = {name: read_json(out / "prediction.json") for name, out in outs.items()}
        assert records["best0"]["checkpoint_name"] == "best" and records["best0"]["folds"] == ["0"]
        assert records["best0"]["checkpoint_file"] == "checkpoint_best.pth"
        assert records["final0"]["checkpoint_name"] == "final"
        with pytest.raises(DesamError, match="checkpoint_best.pth: not found"):
            load_model(predict_env.box, ["1"], CPU, "best")
    finally:
        best.unlink()


@pytest.mark.slow
def test_cached_features_give_the_same_masks(predict_env, tmp_path):
    image = predict_env.raw / "imagesTr" / "SiteA_Case00_0000.nii.gz"
    cached_z = read_json(predict_env.pre / DATASET / "DeSAMPlans_tiny" / "SiteA_Case00" / "meta.json")["z"]
    assert 0 < len(cached_z) < 6
    model = load_model(predict_env.box, ["0"], CPU)
    run = predictor.resolve_run(model.plan, PredictionSettings(save_probabilities=True), CPU)
    outputs = {}
    for use_cache in (True, False):
        engine = predictor.build_predictor(model, run, preprocessed_root=predict_env.pre, use_cache=use_cache)
        out = tmp_path / f"cache{use_cache}"
        # Another name, same content: the cache is found by content, not by file name.
        result = engine.predict_case(CaseInput("renamed", (image,)), out)
        assert result.cached_slices == (len(cached_z) if use_cache else 0)
        assert engine.encoder.slices_encoded == 6 - result.cached_slices
        outputs[use_cache] = out
    masks = [np.asanyarray(nib.load(str(outputs[u] / "renamed.nii.gz")).dataobj) for u in (True, False)]
    probabilities = [np.load(outputs[u] / "renamed.npz")["probabilities"] for u in (True, False)]
    assert np.array_equal(masks[0], masks[1])
    assert np.allclose(probabilities[0], probabilities[1], atol=1e-5)


@pytest.mark.slow
def test_continue_skips_finished_cases_and_keeps_their_quality(predict_env, tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    for seed, case in enumerate(("007", "b")):
        write_volume(inputs / f"{case}.nii.gz", (30, 30, 2), np.diag([1.0, 1.0, 2.0, 1.0]), seed=seed)
    assert run_cli("-i", inputs / "007.nii.gz", "-o", out, "-m", predict_env.box, "-f", "0", *predict_env.roots) == 0
    first = out / "007.nii.gz"
    before = (first.read_bytes(), first.stat().st_mtime_ns)
    capsys.readouterr()
    assert run_cli("-i", inputs, "-o", out, "-m", predict_env.box, "-f", "0", "--continue", *predict_env.roots) == 0
    assert "1 predicted" in capsys.readouterr().out
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before
    assert (out / "b.nii.gz").is_file()
    # The skipped case keeps its rows, and its id keeps its leading zeros.
    assert quality(out).groupby("case").size().to_dict() == {"007": 2, "b": 2}


def _three_cases(folder: Path) -> list[str]:
    cases = ["c0", "c1", "c2"]
    for seed, case in enumerate(cases):
        write_volume(folder / f"{case}_0000.nii.gz", (30, 26, 2), np.diag([1.0, 1.2, 2.5, 1.0]), seed=seed)
    return cases


@pytest.mark.slow
def test_two_parts_write_every_case_once(predict_env, tmp_path, monkeypatch):
    inputs, out = tmp_path / "in", tmp_path / "out"
    cases = _three_cases(inputs)
    written = []
    original = predictor.save_like

    def counting_save_like(array, reference, target, dtype):
        written.append(Path(target).name)
        original(array, reference, target, dtype)

    monkeypatch.setattr(predictor, "save_like", counting_save_like)
    for part in ("0", "1"):
        assert run_cli("-i", inputs, "-o", out, "-m", predict_env.box, "-f", "0", "--num-parts", "2", "--part-id", part,
                       *predict_env.roots) == 0
        if part == "0":
            assert sorted(written) == ["c0.nii.gz", "c2.nii.gz"]
    assert sorted(written) == [f"{c}.nii.gz" for c in cases]
    assert quality(out).groupby("case").size().to_dict() == {c: 2 for c in cases}


@pytest.mark.slow
@pytest.mark.torchrun
@pytest.mark.timeout(300)
def test_torchrun_two_ranks_write_every_case_once(predict_env, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    cases = _three_cases(inputs)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "desam_pipeline.inference.predict", "-i", str(inputs), "-o", str(out), "-m", str(predict_env.box),
               "-f", "0", "--device", "cpu", *predict_env.roots]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, encoding="utf-8", timeout=280, env=environment)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "part 1/2: 2 of 3 cases" in proc.stdout and "part 2/2: 1 of 3 cases" in proc.stdout
    assert "desam_predict: 3 predicted" in proc.stdout
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{c}.nii.gz" for c in cases]
    assert quality(out).groupby("case").size().to_dict() == {c: 2 for c in cases}


@pytest.mark.slow
def test_bad_cases_are_reported_and_skipped(predict_env, tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    write_volume(inputs / "good_0000.nii.gz", (30, 30, 2), affine)
    nan = np.ones((30, 30, 2), np.float32)
    nan[3, 3, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, affine), str(inputs / "nan_0000.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((30, 30), np.float32), affine), str(inputs / "flat_0000.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((30, 30, 2, 2), np.float32), affine), str(inputs / "fourd_0000.nii.gz"))
    write_volume(inputs / "two_0000.nii.gz", (30, 30, 2), affine)
    write_volume(inputs / "two_0001.nii.gz", (30, 30, 2), affine)
    (inputs / "corrupt_0000.nii.gz").write_bytes(b"not a nifti file")
    write_volume(inputs / "unnamed.nii.gz", (30, 30, 2), affine)
    assert run_cli("-i", inputs, "-o", out, "-m", predict_env.box, "-f", "0", *predict_env.roots) == 1
    captured = capsys.readouterr()
    assert "1 predicted" in captured.out and "6 failed" in captured.out
    for name in ("nan_0000.nii.gz", "flat_0000.nii.gz", "fourd_0000.nii.gz", "two_0001.nii.gz",
                 "corrupt_0000.nii.gz", "unnamed.nii.gz"):
        assert name in captured.err
    assert "NaN" in captured.err and "expected a 3D volume" in captured.err
    for case in ("nan", "flat", "fourd", "two", "corrupt", "unnamed"):
        assert f"failed: {case}:" in captured.err
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["good.nii.gz"]
    assert set(quality(out)["case"]) == {"good"}


@pytest.mark.slow
def test_wrong_sam_checkpoint_and_ambiguous_model_are_one_line_errors(predict_env, tmp_path, capsys):
    path = tmp_path / "x.nii.gz"
    write_volume(path, (20, 20, 1), np.eye(4))
    other = save_sam_checkpoint(build_sam("tiny", seed=1), tmp_path / "other_tiny.pth")
    assert run_cli("-i", path, "-o", tmp_path / "o", "-m", predict_env.box, "--checkpoint", other, *predict_env.roots) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs from the plan's checkpoint_sha256" in err[0] and "other_tiny.pth" in err[0]
    assert run_cli("-i", path, "-o", tmp_path / "o", "-d", "900", *predict_env.roots) == 1
    assert "several model folders match" in capsys.readouterr().err
    assert run_cli("-i", path, "-o", tmp_path / "o", "-m", predict_env.box, "-f", "3", *predict_env.roots) == 1
    assert "fold_3" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_inputs_are_found_by_nnunet_or_plain_naming_and_clashes_flagged(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("b.nii.gz", "a.nii", "a.nii.gz", "notes.txt", ".tmp-1-c.nii.gz"):
        (plain / name).touch()
    found = discover_inputs(plain)
    assert [(c.case, c.problem is None) for c in found] == [("a", True), ("a", False), ("b", True)]
    nnunet = tmp_path / "nnunet"
    nnunet.mkdir()
    for name in ("x_0000.nii.gz", "y_0000.nii.gz", "y_0001.nii.gz", "z_0001.nii.gz"):
        (nnunet / name).touch()
    found = {c.case: c for c in discover_inputs(nnunet, num_channels=1)}
    assert found["x"].problem is None and found["x"].files == (nnunet / "x_0000.nii.gz",)
    assert "y_0001.nii.gz" in found["y"].problem and "z_0001.nii.gz" in found["z"].problem
    assert discover_inputs(nnunet / "x_0000.nii.gz")[0].case == "x"


def test_find_model_folder_picks_the_folder_of_the_given_source_site(tmp_path):
    for source in ("RUNMC", "BMC"):
        (tmp_path / model_folder_name("DeSAMTrainer", "DeSAMPlans_tiny", "grid", [source])).mkdir()
    found = find_model_folder(tmp_path, ["BMC"], "grid")
    assert found.name == model_folder_name("DeSAMTrainer", "DeSAMPlans_tiny", "grid", ["BMC"])
    with pytest.raises(DesamError, match="several model folders"):
        find_model_folder(tmp_path, None, "grid")


def test_calibrated_threshold_predicts_with_each_folds_stored_threshold(predict_env, tmp_path, capsys):
    """--iou-threshold calibrated gates with the threshold stored in the fold's checkpoint: the same masks as that
    number given by hand; a checkpoint without one, or one calibrated at another grid size, is a one-line error
    before anything is written."""
    path = tmp_path / "in" / "k_0000.nii.gz"
    write_volume(path, (40, 36, 4), np.diag([0.8, 0.8, 3.0, 1.0]), seed=5)
    refused = tmp_path / "refused"
    assert run_cli("-i", path, "-o", refused, "-m", predict_env.grid, "--grid", "2", "--grid-rule", "top1",
                   "--iou-threshold", "calibrated", *predict_env.roots) != 0
    assert "no calibrated gate threshold" in capsys.readouterr().err
    assert not list(refused.glob("*.nii.gz")) and not (refused / "prediction.json").exists()

    _, [(_, iou)] = manual_prediction(predict_env, predict_env.grid, ["0"], path,
                                      PredictionSettings(grid=2, iou_threshold=-1, grid_rule="top1"))
    threshold = float(np.median(iou))  # some slices pass, some do not
    assert (iou > threshold).any() and (iou <= threshold).any()
    folder = tmp_path / "results" / DATASET / predict_env.grid.name
    shutil.copytree(predict_env.grid, folder)
    final = folder / "fold_0" / CHECKPOINT_FINAL
    checkpoint = Checkpoint.load(final)
    checkpoint.gate_calibration = {"threshold": threshold, "grid": 2}
    checkpoint.save(final)
    outs = {name: tmp_path / name for name in ("calibrated", "number")}
    for name, value in (("calibrated", "calibrated"), ("number", str(threshold))):
        assert run_cli("-i", path, "-o", outs[name], "-m", folder, "--grid", "2", "--grid-rule", "top1",
                       "--iou-threshold", value, "--save-probabilities", *predict_env.roots) == 0
    calibrated, number = (np.load(out / "k.npz")["probabilities"] for out in outs.values())
    assert np.array_equal(calibrated, number)
    kept = np.asarray(nib.load(str(outs["number"] / "k.nii.gz")).dataobj).any(axis=(0, 1))
    assert 0 < kept.sum() < kept.size  # the threshold decided: some slices emptied, some kept
    record = read_json(outs["calibrated"] / "prediction.json")
    assert record["iou_threshold"] == "calibrated" and record["gate_thresholds"] == {"": [threshold]}

    assert run_cli("-i", path, "-o", tmp_path / "grid3", "-m", folder, "--grid", "3", "--iou-threshold", "calibrated",
                   *predict_env.roots) != 0
    assert "calibrated at a 2x2 grid" in capsys.readouterr().err
