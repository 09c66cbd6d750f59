"""desam_train on a tiny cached toy dataset: outputs, exact resume, missing cache, no image encoder,
learning, a self-contained model folder, and DDP on 2 CPU processes equal to one process."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT

from desam_pipeline.data import cache
from desam_pipeline.data.orientation import from_slices, plan_orientation
from desam_pipeline.data.slice_grid import place_slices
from desam_pipeline.inference import slice_prediction
from desam_pipeline.inference.postprocessing import postprocess
from desam_pipeline.inference.settings import PredictionSettings
from desam_pipeline.io.results_layout import Checkpoint
from desam_pipeline.network import DeSAM
from desam_pipeline.network.sam_models import build_sam, save_sam_checkpoint
from desam_pipeline.training import train
from desam_pipeline.training.registry import trainer_class
from desam_pipeline.training.schedule import epoch_record, reduce_validation, restored_history, validation_sums
from desam_pipeline.training.settings import TrainingSettings, resume_differences
from desam_pipeline.training.trainer import DeSAMTrainer
from desam_pipeline.training import validation
from desam_pipeline.training.validation import SLICE_SCORES
from desam_pipeline.utilities.errors import DesamError

from toy_data import TINY_TAPS
from toy_runs import COMMON, DATASET, MODEL, PLANS, SHAPE, final_state, fold_dir, run_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_epoch_run_writes_every_output(trained_fold, toy_cache):
    model_dir = trained_fold.parent
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        assert (model_dir / name).is_file()
    assert json.loads((model_dir / "plans.json").read_text(encoding="utf-8")) == \
        json.loads((toy_cache / "pre" / DATASET / f"{PLANS}.json").read_text(encoding="utf-8"))
    for name in ("checkpoint_latest.pth", "checkpoint_best.pth", "checkpoint_final.pth", "training_log.txt",
                 "progress.png", "debug.json"):
        assert (trained_fold / name).is_file(), name
    assert (trained_fold / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(trained_fold.glob(".tmp-*"))
    log = (trained_fold / "training_log.txt").read_text(encoding="utf-8")
    assert "epoch 1/2" in log and "epoch 2/2" in log and "val_dice" in log

    debug = json.loads((trained_fold / "debug.json").read_text(encoding="utf-8"))
    assert (debug["epochs"], debug["batch_size"], debug["lr"], debug["seed"], debug["mode"]) == (2, 2, 1e-4, 7, "box")
    assert debug["loss_weights"] == [1.0, 1.0, 0.0] and debug["optimizer"] == "Adam" and debug["precision"] == "fp32"
    assert debug["train_cases"] and debug["val_cases"] and not set(debug["train_cases"]) & set(debug["val_cases"])
    counts = debug["parameter_counts"]
    assert counts["total"] == counts["prim.prompt_encoder"] + counts["prim.mask_decoder"] + counts["pdmm"] > 0
    assert "torch" in debug["versions"]
    compute = debug["compute"]  # what decides the last bits: this process's threads and the CPU torch sees
    assert compute["torch_threads"] == torch.get_num_threads() >= 1 and compute["processor"]
    assert compute["cpu_capability"] == torch.backends.cpu.get_cpu_capability()

    checkpoint = final_state(trained_fold)
    assert checkpoint["epoch"] == 2 and len(checkpoint["history"]["train_loss"]) == 2
    assert {"optimizer", "scaler", "rng", "network_config"} <= set(checkpoint)
    assert checkpoint["network_config"]["tap_shapes"] == TINY_TAPS and checkpoint["network_config"]["encoder"] == "tiny"
    assert all(np.isfinite(checkpoint["history"][k]).all() for k in ("train_loss", "val_loss", "val_dice", "lr"))
    assert checkpoint["history"]["lr"][1] < checkpoint["history"]["lr"][0] == 1e-4  # poly decay per epoch

    (val_case,) = debug["val_cases"]
    summary = json.loads((trained_fold / "validation" / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["cases"]) == {val_case}
    assert summary["prediction"] == {"grid": 9, "iou_threshold": 0.5, "grid_rule": "reference", "postprocess": "largest"}
    assert {"dice", "hd95", "fp_slices_pct"} <= set(summary["cases"][val_case]) and "dice" in summary["mean"]
    assert summary["cases"][val_case]["gate_auc"] is None  # box mode: no gate
    mask = nib.load(str(trained_fold / "validation" / f"{val_case}.nii.gz"))
    assert mask.shape == (256, 256, SHAPE[2])
    np.testing.assert_allclose(nib.affines.voxel_sizes(mask.affine), [0.8 * 40 / 256, 0.8 * 36 / 256, 3.0])


@pytest.fixture(scope="module")
def interrupted(toy_cache) -> Path:
    """The same run stopped by Ctrl-C after its first epoch (its results root)."""
    original = DeSAMTrainer.on_epoch_end

    def interrupt_after_first_epoch(self, epoch, *args):
        original(self, epoch, *args)
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DeSAMTrainer, "on_epoch_end", interrupt_after_first_epoch)
        assert run_cli(toy_cache, "interrupted", "--num-workers", "0") == 130
    folder = fold_dir(toy_cache, "interrupted")
    assert (folder / "checkpoint_latest.pth").is_file() and not (folder / "checkpoint_final.pth").exists()
    return toy_cache / "interrupted"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_resume_after_an_interruption_ends_with_the_same_weights(trained_fold, toy_cache, interrupted):
    shutil.copytree(interrupted, toy_cache / "resumed")
    assert run_cli(toy_cache, "resumed", "-c", "--num-workers", "1") == 0  # workers do not change the samples
    folder = fold_dir(toy_cache, "resumed")
    reference, resumed = final_state(trained_fold), final_state(folder)
    assert reference["network"].keys() == resumed["network"].keys()
    for key, value in reference["network"].items():
        assert torch.equal(value, resumed["network"][key]), key
    assert reference["history"]["train_loss"] == resumed["history"]["train_loss"]
    assert reference["history"]["val_loss"] == resumed["history"]["val_loss"]
    assert "resumed" in (folder / "training_log.txt").read_text(encoding="utf-8")


@pytest.mark.slow
def test_resume_refuses_other_settings(trained_fold, toy_cache, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main([*COMMON, "-c", "--lr", "0.001", "--preprocessed", str(toy_cache / "pre"),
                    "--results", str(toy_cache / "results")])
    assert exit_info.value.code == 1
    assert "other settings (lr 0.0001 -> 0.001)" in capsys.readouterr().err


@pytest.mark.slow
def test_missing_cases_fail_with_the_command_that_fixes_them(toy_cache, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["900", "0", "--source", "SiteB", "--device", "cpu", "--preprocessed", str(toy_cache / "pre"),
                    "--results", str(toy_cache / "nothing")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "2 source case(s) not cached with this plan (SiteB_Case00, SiteB_Case01)" in err
    assert f"desam_plan_and_embed -d {DATASET} --encoder tiny" in err and f"--plans-name {PLANS} --domains SiteB" in err
    assert not (toy_cache / "nothing").exists()


@pytest.mark.slow
def test_fold_all_learns_without_any_image_encoder(toy_cache, monkeypatch):
    """Fold `all`: the same four slices each epoch, a fixed (whole-box) prompt, no validation; loss drops."""
    def no_encoder(*args, **kwargs):
        raise AssertionError("training built an image encoder")

    monkeypatch.setattr(ImageEncoderViT, "__init__", no_encoder)
    settings = TrainingSettings(mode="box", epochs=2, batch_size=2, lr=1e-3, seed=0, device="cpu", num_workers=0)
    trainer = DeSAMTrainer(toy_cache / "pre" / DATASET, toy_cache / "learn", PLANS, "all", sources=["SiteA"],
                           settings=settings)
    trainer.run_training()
    losses = trainer.history["train_loss"]
    assert losses[-1] < losses[0] * 0.9, losses
    assert trainer.train_cases == ["SiteA_Case00", "SiteA_Case01"] and trainer.val_cases == []
    assert all(np.isnan(trainer.history["val_dice"]))
    folder = toy_cache / "learn" / MODEL / "fold_all"
    assert (folder / "checkpoint_final.pth").is_file() and (folder / "progress.png").is_file()
    assert not (folder / "checkpoint_best.pth").exists() and not (folder / "validation").exists()


@pytest.mark.slow
def test_grid_mode_steps_score_the_iou_head(toy_cache):
    trainer = DeSAMTrainer(toy_cache / "pre" / DATASET, toy_cache / "grid", PLANS, 0, sources=["SiteA"],
                           settings=TrainingSettings(mode="grid", batch_size=2, seed=0, device="cpu", num_workers=0))
    trainer.initialize()
    batch = next(iter(trainer.val_loader))
    assert set(batch["iou_target"].tolist()) <= {0.0, 1.0}
    sums = trainer.validation_step(batch)
    on_object = int((batch["iou_target"] > 0.5).sum())
    assert sums["count"] == 2 and sums["tp"] + sums["fn"] == float((batch["label"] > 0).sum())
    assert sums["on_object"] == (batch["iou_target"] > 0.5).tolist() and len(sums["iou_scores"]) == 2
    head = trainer.network.prim.mask_decoder.iou_prediction_head.layers[-1]
    saved = {k: v.clone() for k, v in head.state_dict().items()}
    with torch.no_grad():
        head.weight.zero_()
        for bias, agreeing in ((5.0, on_object), (-5.0, 2 - on_object)):
            head.bias.fill_(bias)  # the IoU head now says "on the object" (5) or "off it" (-5) for every point
            assert trainer.validation_step(batch)["iou_agree"] == agreeing
        head.load_state_dict(saved)
    assert trainer.validation_step(batch)["iou_agree"] == sums["iou_agree"]
    before = {k: v.clone() for k, v in trainer.network.prim.mask_decoder.iou_prediction_head.state_dict().items()}
    loss = trainer.train_step(batch)
    assert np.isfinite(loss)
    after = trainer.network.prim.mask_decoder.iou_prediction_head.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the IoU head trains in grid mode


@pytest.mark.slow
def test_val_only_redoes_the_final_validation(trained_fold, toy_cache):
    summary = trained_fold / "validation" / "summary.json"
    before = json.loads(summary.read_text(encoding="utf-8"))
    summary.unlink()
    assert run_cli(toy_cache, "results", "--val-only", "--num-workers", "0") == 0
    assert json.loads(summary.read_text(encoding="utf-8")) == before


@pytest.mark.slow
def test_grid_final_validation_calibrates_the_gate_into_the_final_checkpoint(toy_cache, monkeypatch):
    """The final validation pools the held-out slices' best predicted IoU, calibrates the gate on them and stores
    the result in checkpoint_final.pth (what `--iou-threshold calibrated` reads), in summary.json and in the log;
    the other checkpoints carry none. The toy cache holds only slices with the structure, so the real run can
    calibrate nothing (None, said so); `--val-only` on held-out scores of both kinds then stores a threshold."""
    flags = ["--mode", "grid", "--epochs", "1", "--val-grid", "2", "--val-grid-rule", "top1", "--num-workers", "0"]
    assert run_cli(toy_cache, "calib", *flags) == 0
    folder = toy_cache / "calib" / DATASET / MODEL.replace("__box__", "__grid__") / "fold_0"
    summary_file = folder / "validation" / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    (case,) = summary["cases"]
    scores = summary["cases"][case][SLICE_SCORES]
    assert len(scores["best_iou"]) == len(scores["has_structure"]) > 0 and all(scores["has_structure"])
    assert summary["gate_calibration"] is None
    assert Checkpoint.load(folder / "checkpoint_final.pth").gate_calibration is None
    assert "gate calibration: no threshold" in (folder / "training_log.txt").read_text(encoding="utf-8")

    held_out = {SLICE_SCORES: {"best_iou": [0.1, 0.3, 0.2, 0.25], "has_structure": [False, True, False, True]}}
    monkeypatch.setattr(validation, "validate_cases",
                        lambda *args, **kwargs: {case: {**summary["cases"][case], **held_out}})
    assert run_cli(toy_cache, "calib", *flags, "--val-only") == 0
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    expected = {"threshold": pytest.approx(0.225), "youden_j": 1.0, "sensitivity": 1.0, "specificity": 1.0,
                "slices_with": 2, "slices_without": 2, "grid": 2, "grid_rule": "top1", "cases": [case]}
    assert summary["gate_calibration"] == expected
    assert Checkpoint.load(folder / "checkpoint_final.pth").gate_calibration == summary["gate_calibration"]
    assert Checkpoint.load(folder / "checkpoint_latest.pth").gate_calibration is None
    log = (folder / "training_log.txt").read_text(encoding="utf-8")
    assert "gate calibration: threshold 0.2250 at a 2x2 grid" in log


@pytest.mark.slow
def test_model_folder_alone_rebuilds_the_network(trained_fold, toy_cache, tmp_path):
    """plans.json + checkpoint_final.pth, copied anywhere, give a network that predicts the validation masks."""
    copy = tmp_path / "model"
    (copy / "fold_0").mkdir(parents=True)
    (copy / "plans.json").write_bytes((trained_fold.parent / "plans.json").read_bytes())
    (copy / "fold_0" / "checkpoint_final.pth").write_bytes((trained_fold / "checkpoint_final.pth").read_bytes())

    plan = json.loads((copy / "plans.json").read_text(encoding="utf-8"))
    checkpoint = final_state(copy / "fold_0")
    config = checkpoint["network_config"]
    assert config["tap_shapes"] == plan["tap_shapes"]
    net = DeSAM.from_inference_state(checkpoint["network"], config)
    (val_case,) = json.loads((trained_fold / "debug.json").read_text(encoding="utf-8"))["val_cases"]
    arrays = cache.open_case(cache.cache_dir(toy_cache / "pre" / DATASET, plan["plans_name"]) / val_case)
    probabilities, _ = slice_prediction.predict_slices(net, arrays["neck"], [arrays[f"tap{i}"] for i in range(3)],
                                                config["mode"])
    written = np.asarray(nib.load(str(trained_fold / "validation" / f"{val_case}.nii.gz")).dataobj)
    # the cached slices are in SAM's orientation; the written mask is back in the volume's (x, y) order
    assert plan_orientation(plan) == "simpleitk"
    # then, as the validation does, every slice of the volume (uncached ones empty) post-processed by the rule
    # its summary records
    rule = json.loads((trained_fold / "validation" / "summary.json").read_text(encoding="utf-8"))
    meta = arrays["meta"]
    volume = place_slices(from_slices(probabilities > 0.5, 0, "simpleitk"), meta["z"], meta["shape"][2])
    expected = np.moveaxis(postprocess(volume, rule["prediction"]["postprocess"], slice_axis=0) > 0, 0, 2)
    np.testing.assert_array_equal(written, expected.astype(np.uint8))


def run_torchrun(toy_cache: Path, results: str, *extra: str) -> None:
    """desam_train under torchrun with 2 CPU processes (gloo), one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "desam_pipeline.training.train", *COMMON, "--num-workers", "0", *extra,
               "--preprocessed", str(toy_cache / "pre"), "--results", str(toy_cache / results)]
    result = subprocess.run(command, env=env, capture_output=True, encoding="utf-8", timeout=380, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_same_training(single: dict, ddp: dict) -> None:
    """Same losses, and the same weights up to reduction order as amplified by Adam."""
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose(ddp["history"][key], single["history"][key], rtol=1e-4)
    # Dice counts thresholded pixels: a pixel whose logit is ~0 may flip; allow a few in thousands.
    np.testing.assert_allclose(ddp["history"]["val_dice"], single["history"]["val_dice"], atol=2e-3)
    difference = torch.cat([(single["network"][k] - ddp["network"][k]).flatten() for k in single["network"]])
    # Adam divides by sqrt(v): where a gradient is ~0, reduction-order noise can flip its step, moving
    # that weight by up to ~lr per step. Such weights are rare; everything else agrees to float precision.
    assert (difference.abs() > 1e-5).float().mean() < 1e-3
    assert difference.abs().max() <= 2 * sum(single["history"]["lr"])


@pytest.mark.slow
@pytest.mark.torchrun
@pytest.mark.timeout(400)
def test_ddp_on_two_cpu_processes_matches_one_process(trained_fold, toy_cache, tiny_checkpoint):
    """torchrun, gloo, global batch 2 = 1 per rank: same losses and weights as one process."""
    run_torchrun(toy_cache, "ddp")
    folder = fold_dir(toy_cache, "ddp")
    log = (folder / "training_log.txt").read_text(encoding="utf-8")
    assert log.count("epoch 2/2") == 1 and "world size 2" in log  # rank 0 alone writes
    assert json.loads((folder / "debug.json").read_text(encoding="utf-8"))["local_batch_size"] == 1
    single, ddp = final_state(trained_fold), final_state(folder)
    assert_same_training(single, ddp)
    torch.manual_seed(7)  # the trainer's seed for rank 0, which DDP broadcasts: the initial weights
    initial = DeSAM.from_sam_checkpoint(tiny_checkpoint, "tiny", TINY_TAPS).inference_state_dict()
    update = torch.cat([(single["network"][k] - initial[k]).flatten() for k in initial])
    assert (update.abs() > 1e-6).float().mean() > 0.5  # most weights moved: the comparison is not vacuous


@pytest.mark.slow
@pytest.mark.torchrun
@pytest.mark.timeout(400)
def test_ddp_resumes_a_single_process_run(trained_fold, toy_cache, interrupted):
    """-c under torchrun: epoch 2 of the interrupted run on 2 ranks ends where one process ends."""
    shutil.copytree(interrupted, toy_cache / "ddp_resumed")
    run_torchrun(toy_cache, "ddp_resumed", "-c")
    folder = fold_dir(toy_cache, "ddp_resumed")
    log = (folder / "training_log.txt").read_text(encoding="utf-8")
    assert log.count("resumed") == 1 and log.count("epoch 2/2") == 1
    assert_same_training(final_state(trained_fold), final_state(folder))


@pytest.mark.slow
def test_a_different_sam_checkpoint_is_refused(toy_cache, tmp_path):
    pre = tmp_path / "pre"
    shutil.copytree(toy_cache / "pre", pre)  # a complete cache: every array meta.json lists
    plan_file = pre / DATASET / f"{PLANS}.json"
    plan = json.loads(plan_file.read_text(encoding="utf-8"))
    other = tmp_path / "other.pth"
    save_sam_checkpoint(build_sam("tiny", seed=1), other)
    plan_file.write_text(json.dumps({**plan, "checkpoint": str(other)}))
    trainer = DeSAMTrainer(pre / DATASET, tmp_path / "res", PLANS, 0, sources=["SiteA"],
                           settings=TrainingSettings(device="cpu"))
    with pytest.raises(DesamError, match="differs from the plan's checkpoint_sha256"):
        trainer.initialize()


@pytest.mark.slow
def test_precision_defaults_to_bf16_on_cpu_and_refuses_fp16_there(toy_cache, tmp_path):
    def trainer(precision: str) -> DeSAMTrainer:
        return DeSAMTrainer(toy_cache / "pre" / DATASET, tmp_path, PLANS, 0, sources=["SiteA"],
                            settings=TrainingSettings(device="cpu", precision=precision))

    assert trainer("auto").precision == "bf16" and trainer("fp32").precision == "fp32"
    with pytest.raises(DesamError, match="fp16 autocast is not supported on CPU"):
        trainer("fp16")


def on_cpu(tmp_path: Path, trainer: type[DeSAMTrainer] = DeSAMTrainer, **settings) -> DeSAMTrainer:
    """A trainer of fold 0 of plan P on the CPU with these settings (nothing is read until it initialises)."""
    return trainer(tmp_path, tmp_path, "P", 0, settings=TrainingSettings(device="cpu", **settings))


def test_loss_setting_and_its_weights_are_recorded_in_the_config(tmp_path):
    grid = on_cpu(tmp_path, mode="grid", loss="reference")
    assert grid.config()["loss"] == "reference" and grid.config()["loss_weights"] == [1.0, 0.0, 1.0]
    box = on_cpu(tmp_path, mode="box", loss="reference")
    assert box.config()["loss_weights"] == [1.0, 0.0, 0.0]
    default = on_cpu(tmp_path, mode="grid")
    assert default.config()["loss"] == "batch" and default.config()["loss_weights"] == [1.0, 1.0, 10.0]
    assert default.config()["sampling"] == "balanced"
    paper = on_cpu(tmp_path, mode="grid", loss="paper")
    assert paper.config()["loss"] == "paper" and paper.config()["loss_weights"] == [1.0, 1.0, 10.0]
    with pytest.raises(DesamError, match="unknown loss"):
        on_cpu(tmp_path, loss="monai")


def test_pdmm_layout_is_recorded_and_an_unknown_one_refused(tmp_path):
    assert on_cpu(tmp_path).config()["pdmm"] == "desam"
    assert on_cpu(tmp_path, pdmm="reference").config()["pdmm"] == "reference"
    with pytest.raises(DesamError, match="unknown PDMM layout 'unet'"):
        on_cpu(tmp_path, pdmm="unet")
    with pytest.raises(DesamError, match="CoupledSAMTrainer has no PDMM"):
        on_cpu(tmp_path, trainer_class("CoupledSAMTrainer"), pdmm="reference")
    assert train.build_parser().parse_args(["1", "0", "--pdmm", "reference"]).pdmm == "reference"


def test_out_of_range_settings_are_one_line_errors(tmp_path):
    for settings, message in (({"epochs": 0}, r"epochs \(0\) must be >= 1"), ({"num_workers": -1}, "--num-workers"),
                              ({"loss_weights": (1.0, float("nan"), 1.0)}, "--loss-weights must be three finite"),
                              ({"train_slices": "some"}, "unknown train slices 'some'")):
        with pytest.raises(DesamError, match=message):
            on_cpu(tmp_path, **settings)
    assert on_cpu(tmp_path, trainer_class("ZeroShotSAMTrainer"), epochs=7).config()["epochs"] == 0


def test_resume_compares_the_recorded_settings(tmp_path):
    """Only RESUME_KEYS count; a checkpoint written before a key existed ran with its RESUME_DEFAULTS value."""
    current = on_cpu(tmp_path, lr=1e-3).config()
    saved = {**current, "lr": 1e-4, "num_workers": 5}
    del saved["train_slices"]
    assert resume_differences(saved, current) == ["lr 0.0001 -> 0.001"]
    assert resume_differences({**saved, "lr": 1e-3, "train_slices": "foreground"}, current) == \
        ["train_slices 'foreground' -> 'all'"]


def test_epoch_record_carries_the_gate_auc_in_grid_mode_only():
    val = validation_sums() | {"loss": 2.0, "count": 4, "tp": 3.0, "fp": 1.0, "fn": 0.0, "iou_agree": 3.0,
                               "iou_scores": [0.9, 0.2, 0.6, 0.1], "on_object": [True, False, True, False]}
    reduced = reduce_validation(dict(val), torch.device("cpu"))
    assert reduced["gate_auc"] == 1.0 and "iou_scores" not in reduced
    swapped = reduce_validation(val | {"on_object": [False, True, True, False]}, torch.device("cpu"))
    assert swapped["gate_auc"] == 0.5
    grid = epoch_record({"loss": 1.0, "count": 4}, reduced, True, None, 1e-3, 1.0, 0.0)
    box = epoch_record({"loss": 1.0, "count": 4}, reduced, False, None, 1e-3, 1.0, 0.0)
    assert grid["gate_auc"] == 1.0 and np.isnan(box["gate_auc"])
    old = {k: [1.0, 2.0] for k in ("train_loss", "val_loss", "val_dice", "val_dice_ema", "iou_accuracy", "lr",
                                   "epoch_time", "data_wait")}
    restored = restored_history(old)
    assert np.isnan(restored["gate_auc"]).all() and len(restored["gate_auc"]) == 2 and restored["lr"] == [1.0, 2.0]


def test_final_validation_predicts_with_the_runs_grid_and_rule():
    """--val-grid and --val-grid-rule reach the final validation's prediction settings (and so its summary.json);
    the defaults are desam_predict's."""
    chosen = DeSAMTrainer.validation_settings(
        SimpleNamespace(settings=TrainingSettings(val_grid=3, val_grid_rule="top1")))
    assert (chosen.grid, chosen.grid_rule) == (3, "top1")
    default = DeSAMTrainer.validation_settings(SimpleNamespace(settings=TrainingSettings()))
    assert default == PredictionSettings() and (default.grid, default.grid_rule) == (9, "reference")
    with pytest.raises(DesamError, match="unknown --val-grid-rule 'vote'"):
        TrainingSettings(val_grid_rule="vote").validate()
    with pytest.raises(DesamError, match="--val-grid must be at least 1, got 0"):
        TrainingSettings(val_grid=0).validate()


def test_prim_trains_at_its_own_learning_rate_and_the_schedule_keeps_the_ratio(tmp_path):
    """--prim-lr-scale S: PRIM's decoder parameters in their own Adam group at S x lr, every other trainable
    parameter at lr, through the poly schedule; S = 1 keeps the single group that older checkpoints saved."""
    network = DeSAM(TINY_TAPS, 1024, 64)
    prim = {id(p) for p in network.prim.parameters() if p.requires_grad}
    for scale, groups in ((0.1, 2), (1.0, 1)):
        trainer = on_cpu(tmp_path, lr=1e-3, prim_lr_scale=scale, epochs=4)
        trainer.network = network
        optimizer = trainer.build_optimizer()
        assert len(optimizer.param_groups) == groups
        assert sum(len(g["params"]) for g in optimizer.param_groups) == \
            sum(p.requires_grad for p in network.parameters())
        trainer.optimizer, trainer.train_sampler = optimizer, SimpleNamespace(set_epoch=lambda epoch: None)
        trainer.on_epoch_start(2)
        members = [{id(p) in prim for p in group["params"]} for group in optimizer.param_groups]
        assert members == ([{False}, {True}] if groups == 2 else [{False, True}])
        poly = (1 - 2 / 4) ** 0.9 * 1e-3
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([poly, poly * scale][:groups])
    with pytest.raises(DesamError, match="prim-lr-scale"):
        TrainingSettings(prim_lr_scale=0.0).validate()
