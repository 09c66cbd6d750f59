"""desam_train on a tiny cached toy dataset: outputs, exact resume, missing cache, no image encoder,
learning, a self-contained model folder, and DDP on 2 CPU processes equal to one process."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT

from desam_pipeline.data import cache
from desam_pipeline.data.orientation import from_slices, plan_orientation
from desam_pipeline.inference import slice_prediction
from desam_pipeline.network import DeSAM
from desam_pipeline.network.sam_models import build_sam, save_sam_checkpoint
from desam_pipeline.training import train
from desam_pipeline.training.registry import trainer_class
from desam_pipeline.training.trainer import DeSAMTrainer
from desam_pipeline.utilities.errors import DesamError
from plans.plan_and_embed import plan_and_embed

from toy_data import TINY_TAPS, write_toy_dataset

pytestmark = pytest.mark.slow  # trains or embeds (tiny SAM, LiteMedSAM), runs nnU-Net or builds the phantom

DATASET = "Dataset900_Toy"
PLANS = "DeSAMPlans_tiny"
MODEL = f"DeSAMTrainer__{PLANS}__box__src-SiteA"
REPO = Path(__file__).resolve().parents[1]
# Six axial slices with foreground on two (z 2, 3); only those are cached: 2 slices per case.
SHAPE = (40, 36, 6)
# fp32, so one process and DDP agree to float precision (the CPU default, bf16, is tested below)
COMMON = ["900", "0", "--source", "SiteA", "--mode", "box", "--epochs", "2", "--batch-size", "2",
          "--device", "cpu", "--precision", "fp32", "--seed", "7"]


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_checkpoint) -> Path:
    """SiteA of the toy dataset embedded with the tiny SAM (foreground slices only)."""
    root = tmp_path_factory.mktemp("train")
    write_toy_dataset(root / "raw", shape=SHAPE)
    plan_and_embed("900", encoder="tiny", checkpoint=str(tiny_checkpoint), domains=["SiteA"],
                   slices="foreground", raw=str(root / "raw"), preprocessed=str(root / "pre"))
    return root


def run_cli(root: Path, results: str, *extra: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        train.main([*COMMON, *extra, "--preprocessed", str(root / "pre"), "--results", str(root / results)])
    return exit_info.value.code


def fold_dir(root: Path, results: str) -> Path:
    return root / results / DATASET / MODEL / "fold_0"


def final_state(folder: Path) -> dict:
    return torch.load(folder / "checkpoint_final.pth", weights_only=True)


@pytest.fixture(scope="module")
def trained(cached) -> Path:
    """An uninterrupted 2-epoch run, loading in the training process."""
    assert run_cli(cached, "results", "--num-workers", "0") == 0
    return fold_dir(cached, "results")


def test_two_epoch_run_writes_every_output(trained, cached):
    model_dir = trained.parent
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        assert (model_dir / name).is_file()
    assert json.loads((model_dir / "plans.json").read_text()) == \
        json.loads((cached / "pre" / DATASET / f"{PLANS}.json").read_text())
    for name in ("checkpoint_latest.pth", "checkpoint_best.pth", "checkpoint_final.pth", "training_log.txt",
                 "progress.png", "debug.json"):
        assert (trained / name).is_file(), name
    assert (trained / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(trained.glob(".tmp-*"))
    log = (trained / "training_log.txt").read_text()
    assert "epoch 1/2" in log and "epoch 2/2" in log and "val_dice" in log

    debug = json.loads((trained / "debug.json").read_text())
    assert (debug["epochs"], debug["batch_size"], debug["lr"], debug["seed"], debug["mode"]) == (2, 2, 1e-4, 7, "box")
    assert debug["loss_weights"] == [1.0, 1.0, 0.0] and debug["optimizer"] == "Adam" and debug["precision"] == "fp32"
    assert debug["train_cases"] and debug["val_cases"] and not set(debug["train_cases"]) & set(debug["val_cases"])
    counts = debug["parameter_counts"]
    assert counts["total"] == counts["prim.prompt_encoder"] + counts["prim.mask_decoder"] + counts["pdmm"] > 0
    assert "torch" in debug["versions"]

    checkpoint = final_state(trained)
    assert checkpoint["epoch"] == 2 and len(checkpoint["history"]["train_loss"]) == 2
    assert {"optimizer", "scaler", "rng", "network_config"} <= set(checkpoint)
    assert checkpoint["network_config"]["tap_shapes"] == TINY_TAPS and checkpoint["network_config"]["encoder"] == "tiny"
    assert all(np.isfinite(checkpoint["history"][k]).all() for k in ("train_loss", "val_loss", "val_dice", "lr"))
    assert checkpoint["history"]["lr"][1] < checkpoint["history"]["lr"][0] == 1e-4  # poly decay per epoch

    (val_case,) = debug["val_cases"]
    summary = json.loads((trained / "validation" / "summary.json").read_text())
    assert set(summary["cases"]) == {val_case}
    assert {"dice", "hd95"} <= set(summary["cases"][val_case]) and "dice" in summary["mean"]
    mask = nib.load(str(trained / "validation" / f"{val_case}.nii.gz"))
    assert mask.shape == (256, 256, SHAPE[2])
    np.testing.assert_allclose(nib.affines.voxel_sizes(mask.affine), [0.8 * 40 / 256, 0.8 * 36 / 256, 3.0])


@pytest.fixture(scope="module")
def interrupted(cached) -> Path:
    """The same run stopped by Ctrl-C after its first epoch (its results root)."""
    original = DeSAMTrainer.on_epoch_end

    def interrupt_after_first_epoch(self, epoch, *args):
        original(self, epoch, *args)
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DeSAMTrainer, "on_epoch_end", interrupt_after_first_epoch)
        assert run_cli(cached, "interrupted", "--num-workers", "0") == 130
    folder = fold_dir(cached, "interrupted")
    assert (folder / "checkpoint_latest.pth").is_file() and not (folder / "checkpoint_final.pth").exists()
    return cached / "interrupted"


@pytest.mark.timeout(400)
def test_resume_after_an_interruption_ends_with_the_same_weights(trained, cached, interrupted):
    shutil.copytree(interrupted, cached / "resumed")
    assert run_cli(cached, "resumed", "-c", "--num-workers", "1") == 0  # workers do not change the samples
    folder = fold_dir(cached, "resumed")
    reference, resumed = final_state(trained), final_state(folder)
    assert reference["network"].keys() == resumed["network"].keys()
    for key, value in reference["network"].items():
        assert torch.equal(value, resumed["network"][key]), key
    assert reference["history"]["train_loss"] == resumed["history"]["train_loss"]
    assert reference["history"]["val_loss"] == resumed["history"]["val_loss"]
    assert "resumed" in (folder / "training_log.txt").read_text()


def test_resume_refuses_other_settings(trained, cached, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main([*COMMON, "-c", "--lr", "0.001", "--preprocessed", str(cached / "pre"),
                    "--results", str(cached / "results")])
    assert exit_info.value.code == 1
    assert "other settings (lr 0.0001 -> 0.001)" in capsys.readouterr().err


def test_missing_cases_fail_with_the_command_that_fixes_them(cached, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["900", "0", "--source", "SiteB", "--device", "cpu", "--preprocessed", str(cached / "pre"),
                    "--results", str(cached / "nothing")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "2 source case(s) not cached with this plan (SiteB_Case00, SiteB_Case01)" in err
    assert f"desam_plan_and_embed -d {DATASET} --encoder tiny" in err and f"--plans-name {PLANS} --domains SiteB" in err
    assert not (cached / "nothing").exists()


def test_fold_all_learns_without_any_image_encoder(cached, monkeypatch):
    """Fold `all`: the same four slices each epoch, a fixed (whole-box) prompt, no validation; loss drops."""
    def no_encoder(*args, **kwargs):
        raise AssertionError("training built an image encoder")

    monkeypatch.setattr(ImageEncoderViT, "__init__", no_encoder)
    trainer = DeSAMTrainer(cached / "pre" / DATASET, cached / "learn", PLANS, "all", sources=["SiteA"], mode="box",
                           epochs=2, batch_size=2, lr=1e-3, seed=0, device="cpu", num_workers=0)
    trainer.run_training()
    losses = trainer.history["train_loss"]
    assert losses[-1] < losses[0] * 0.9, losses
    assert trainer.train_cases == ["SiteA_Case00", "SiteA_Case01"] and trainer.val_cases == []
    assert all(np.isnan(trainer.history["val_dice"]))
    folder = cached / "learn" / MODEL / "fold_all"
    assert (folder / "checkpoint_final.pth").is_file() and (folder / "progress.png").is_file()
    assert not (folder / "checkpoint_best.pth").exists() and not (folder / "validation").exists()


def test_grid_mode_steps_score_the_iou_head(cached):
    trainer = DeSAMTrainer(cached / "pre" / DATASET, cached / "grid", PLANS, 0, sources=["SiteA"], mode="grid",
                           batch_size=2, seed=0, device="cpu", num_workers=0)
    trainer.initialize()
    batch = next(iter(trainer.val_loader))
    assert set(batch["iou_target"].tolist()) <= {0.0, 1.0}
    sums = trainer.validation_step(batch)
    on_object = int((batch["iou_target"] > 0.5).sum())
    assert sums["count"] == 2 and sums["tp"] + sums["fn"] == float((batch["label"] > 0).sum())
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


def test_val_only_redoes_the_final_validation(trained, cached):
    summary = trained / "validation" / "summary.json"
    before = json.loads(summary.read_text())
    summary.unlink()
    assert run_cli(cached, "results", "--val-only", "--num-workers", "0") == 0
    assert json.loads(summary.read_text()) == before


def test_model_folder_alone_rebuilds_the_network(trained, cached, tmp_path):
    """plans.json + checkpoint_final.pth, copied anywhere, give a network that predicts the validation masks."""
    copy = tmp_path / "model"
    (copy / "fold_0").mkdir(parents=True)
    (copy / "plans.json").write_bytes((trained.parent / "plans.json").read_bytes())
    (copy / "fold_0" / "checkpoint_final.pth").write_bytes((trained / "checkpoint_final.pth").read_bytes())

    plan = json.loads((copy / "plans.json").read_text())
    checkpoint = final_state(copy / "fold_0")
    config = checkpoint["network_config"]
    assert config["tap_shapes"] == plan["tap_shapes"]
    net = DeSAM.from_inference_state(checkpoint["network"], config)
    (val_case,) = json.loads((trained / "debug.json").read_text())["val_cases"]
    arrays = cache.open_case(cache.cache_dir(cached / "pre" / DATASET, plan["plans_name"]) / val_case)
    probabilities, _ = slice_prediction.predict_slices(net, arrays["neck"], [arrays[f"tap{i}"] for i in range(3)],
                                                config["mode"])
    written = np.asarray(nib.load(str(trained / "validation" / f"{val_case}.nii.gz")).dataobj)
    # the cached slices are in SAM's orientation; the written mask is back in the volume's (x, y) order
    assert plan_orientation(plan) == "simpleitk"
    np.testing.assert_array_equal(written[:, :, arrays["meta"]["z"]],
                                  from_slices(probabilities > 0.5, 2, "simpleitk").astype(np.uint8))


def run_torchrun(cached: Path, results: str, *extra: str) -> None:
    """desam_train under torchrun with 2 CPU processes (gloo), one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "desam_pipeline.training.train", *COMMON, "--num-workers", "0", *extra,
               "--preprocessed", str(cached / "pre"), "--results", str(cached / results)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=380, cwd=REPO)
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


@pytest.mark.torchrun
@pytest.mark.timeout(400)
def test_ddp_on_two_cpu_processes_matches_one_process(trained, cached, tiny_checkpoint):
    """torchrun, gloo, global batch 2 = 1 per rank: same losses and weights as one process."""
    run_torchrun(cached, "ddp")
    folder = fold_dir(cached, "ddp")
    log = (folder / "training_log.txt").read_text()
    assert log.count("epoch 2/2") == 1 and "world size 2" in log  # rank 0 alone writes
    assert json.loads((folder / "debug.json").read_text())["local_batch_size"] == 1
    single, ddp = final_state(trained), final_state(folder)
    assert_same_training(single, ddp)
    torch.manual_seed(7)  # the trainer's seed for rank 0, which DDP broadcasts: the initial weights
    initial = DeSAM.from_sam_checkpoint(tiny_checkpoint, "tiny", TINY_TAPS).inference_state_dict()
    update = torch.cat([(single["network"][k] - initial[k]).flatten() for k in initial])
    assert (update.abs() > 1e-6).float().mean() > 0.5  # most weights moved: the comparison is not vacuous


@pytest.mark.torchrun
@pytest.mark.timeout(400)
def test_ddp_resumes_a_single_process_run(trained, cached, interrupted):
    """-c under torchrun: epoch 2 of the interrupted run on 2 ranks ends where one process ends."""
    shutil.copytree(interrupted, cached / "ddp_resumed")
    run_torchrun(cached, "ddp_resumed", "-c")
    folder = fold_dir(cached, "ddp_resumed")
    log = (folder / "training_log.txt").read_text()
    assert log.count("resumed") == 1 and log.count("epoch 2/2") == 1
    assert_same_training(final_state(trained), final_state(folder))


def test_a_different_sam_checkpoint_is_refused(cached, tmp_path):
    pre = tmp_path / "pre"
    shutil.copytree(cached / "pre", pre)  # a complete cache: every array meta.json lists
    plan_file = pre / DATASET / f"{PLANS}.json"
    plan = json.loads(plan_file.read_text())
    other = tmp_path / "other.pth"
    save_sam_checkpoint(build_sam("tiny", seed=1), other)
    plan_file.write_text(json.dumps({**plan, "checkpoint": str(other)}))
    trainer = DeSAMTrainer(pre / DATASET, tmp_path / "res", PLANS, 0, sources=["SiteA"], device="cpu")
    with pytest.raises(DesamError, match="sha256 differs from the plan's checkpoint_sha256"):
        trainer.initialize()


def test_precision_defaults_to_bf16_on_cpu_and_refuses_fp16_there(cached, tmp_path):
    def trainer(precision: str) -> DeSAMTrainer:
        return DeSAMTrainer(cached / "pre" / DATASET, tmp_path, PLANS, 0, sources=["SiteA"], device="cpu",
                            precision=precision)

    assert trainer("auto").precision == "bf16" and trainer("fp32").precision == "fp32"
    with pytest.raises(DesamError, match="fp16 autocast is not supported on CPU"):
        trainer("fp16")


def test_loss_setting_is_recorded_in_the_config(tmp_path):
    grid = DeSAMTrainer(tmp_path, tmp_path, "P", 0, mode="grid", loss="reference", device="cpu")
    assert grid.config()["loss"] == "reference" and grid.config()["loss_weights"] == [1.0, 0.0, 1.0]
    box = DeSAMTrainer(tmp_path, tmp_path, "P", 0, mode="box", loss="reference", device="cpu")
    assert box.config()["loss_weights"] == [1.0, 0.0, 0.0]
    paper = DeSAMTrainer(tmp_path, tmp_path, "P", 0, mode="grid", device="cpu")
    assert paper.config()["loss"] == "paper" and paper.config()["loss_weights"] == [1.0, 1.0, 10.0]
    with pytest.raises(DesamError, match="unknown loss"):
        DeSAMTrainer(tmp_path, tmp_path, "P", 0, loss="monai", device="cpu")


def test_pdmm_layout_is_recorded_in_the_config(tmp_path):
    assert DeSAMTrainer(tmp_path, tmp_path, "P", 0, device="cpu").config()["pdmm"] == "desam"
    assert DeSAMTrainer(tmp_path, tmp_path, "P", 0, pdmm="reference", device="cpu").config()["pdmm"] == "reference"
    with pytest.raises(DesamError, match="unknown PDMM layout 'unet'"):
        DeSAMTrainer(tmp_path, tmp_path, "P", 0, pdmm="unet", device="cpu")
    with pytest.raises(DesamError, match="CoupledSAMTrainer has no PDMM"):
        trainer_class("CoupledSAMTrainer")(tmp_path, tmp_path, "P", 0, pdmm="reference", device="cpu")
    assert train.build_parser().parse_args(["1", "0", "--pdmm", "reference"]).pdmm == "reference"
