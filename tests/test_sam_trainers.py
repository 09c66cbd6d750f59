"""Trainers by name (-tr) and the SAM baselines: CoupledSAM equals segment_anything's MaskDecoder, a coupled
model trains and predicts through desam_predict, a zero-shot fold is scored by desam_evaluate and desam_report."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from desam_pipeline.data import cache
from desam_pipeline.data.orientation import from_slices, in_plane_shape, plan_orientation
from desam_pipeline.data.preprocessing import resize_probabilities_back
from desam_pipeline.inference import predict
from desam_pipeline.inference.model import load_model
from desam_pipeline.io.results_layout import Checkpoint, model_folder_name, parse_model_folder_name
from desam_pipeline.network import CoupledSAM
from desam_pipeline.network.sam_models import build_sam, read_state_dict
from desam_pipeline.training import train
from desam_pipeline.training.registry import trainer_class, trainer_classes
from desam_pipeline.training.sam_trainers import CoupledSAMTrainer
from desam_pipeline.training.settings import TrainingSettings
from evaluation.evaluate import main as evaluate_main
from evaluation.report import main as report_main
from plans.plan_and_embed import plan_and_embed

from toy_data import write_toy_dataset


DATASET = "Dataset900_Toy"
PLANS = "DeSAMPlans_tiny"


def run(entry, argv: list[str]) -> int:
    with pytest.raises(SystemExit) as stop:
        entry([str(a) for a in argv])
    return stop.value.code


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_checkpoint) -> dict:
    """SiteA and SiteB, two 6-slice cases each, every slice of every case embedded with the tiny SAM."""
    root = tmp_path_factory.mktemp("sam_trainers")
    roots = {k: root / k for k in ("raw", "preprocessed", "results")}
    write_toy_dataset(roots["raw"], cases_per_site=2, shape=(40, 36, 6))
    plan_and_embed("900", encoder="tiny", checkpoint=str(tiny_checkpoint), slices="all", device="cpu",
                   raw=str(roots["raw"]), preprocessed=str(roots["preprocessed"]))
    return {"roots": roots, "checkpoint": tiny_checkpoint,
            "train": ["--preprocessed", roots["preprocessed"], "--results", roots["results"]],
            "flags": [f"--{k}={v}" for k, v in roots.items()]}


def sam_decoder(state: dict, checkpoint: Path):
    """segment_anything's own prompt encoder and MaskDecoder with `state`'s weights (prefixed prim.)."""
    sam = build_sam("tiny")
    sam.load_state_dict(read_state_dict(checkpoint))
    sam.prompt_encoder.load_state_dict({k[len("prim.prompt_encoder."):]: v for k, v in state.items()
                                        if k.startswith("prim.prompt_encoder.")})
    sam.mask_decoder.load_state_dict({k[len("prim.mask_decoder."):]: v for k, v in state.items()
                                      if k.startswith("prim.mask_decoder.")})
    return sam.eval()


# ---------------------------------------------------------------- registry and folder names
def test_registry_knows_the_built_in_trainers_and_subclasses():
    assert {"DeSAMTrainer", "CoupledSAMTrainer", "ZeroShotSAMTrainer"} <= set(trainer_classes())
    assert trainer_class("CoupledSAMTrainer") is CoupledSAMTrainer

    class MyTrainer(CoupledSAMTrainer):
        pass

    assert trainer_class("MyTrainer") is MyTrainer
    trainer = MyTrainer(Path("pre"), Path("res"), PLANS, 0, sources=["SiteB", "SiteA"],
                        settings=TrainingSettings(mode="grid", device="cpu"))
    assert trainer.model_dir == Path("res") / f"MyTrainer__{PLANS}__grid__src-SiteA+SiteB"
    assert trainer.config()["trainer"] == "MyTrainer"


def test_folder_names_round_trip():
    name = model_folder_name("CoupledSAMTrainer", "DeSAMPlans_vit_b", "box", ["RUNMC", "BMC"])
    assert name == "CoupledSAMTrainer__DeSAMPlans_vit_b__box__src-BMC+RUNMC"
    parsed = parse_model_folder_name(name)
    assert (parsed.trainer, parsed.plans, parsed.mode, parsed.sites) == ("CoupledSAMTrainer", "DeSAMPlans_vit_b",
                                                                         "box", "BMC+RUNMC")
    assert parsed.name == name
    assert parse_model_folder_name("report") is None and parse_model_folder_name("DeSAMTrainer__p__grid") is None


@pytest.mark.slow
def test_unknown_trainer_is_one_line_listing_the_known_ones(env, capsys):
    assert run(train.main, ["900", "0", "-tr", "NoSuchTrainer", *env["train"]]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown trainer 'NoSuchTrainer'; known trainers:" in err
    assert all(name in err for name in ("CoupledSAMTrainer", "DeSAMTrainer", "ZeroShotSAMTrainer"))
    assert not (env["roots"]["results"] / DATASET).exists()


# ---------------------------------------------------------------- the coupled network is SAM's decoder
@pytest.mark.slow
def test_coupled_forward_equals_sam_mask_decoder(tiny_checkpoint):
    net = CoupledSAM.from_sam_checkpoint(tiny_checkpoint, "tiny").eval()
    sam_state = read_state_dict(tiny_checkpoint)
    for key, value in net.state_dict().items():   # every decoder weight, mask head included, from the file
        assert torch.equal(value, sam_state[key[len("prim."):]]), key
    trained_like = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                    for k, v in net.state_dict().items()}
    net.load_state_dict(trained_like)
    sam = sam_decoder(trained_like, tiny_checkpoint)
    generator = torch.Generator().manual_seed(3)
    neck = torch.randn(3, 256, 64, 64, generator=generator)
    height, width = net.prim.prompt_encoder.input_image_size
    coords = torch.rand(3, 1, 2, generator=generator) * torch.tensor([width, height])
    labels = torch.ones(3, 1, dtype=torch.int64)
    boxes = torch.tensor([[0.0, 0.0, width, height]]).repeat(3, 1)
    with torch.no_grad():
        for prompts in ({"points": (coords, labels)}, {"boxes": boxes}):
            logits, iou = net(neck, None, **prompts)
            assert logits.shape == (3, 1, 256, 256) and iou.shape == (3, 1)
            for b in range(3):
                one = {k: (v[0][b:b + 1], v[1][b:b + 1]) if k == "points" else v[b:b + 1] for k, v in prompts.items()}
                sparse, dense = sam.prompt_encoder(masks=None, **{"points": None, "boxes": None, **one})
                masks, scores = sam.mask_decoder(neck[b:b + 1], sam.prompt_encoder.get_dense_pe(), sparse, dense,
                                                 multimask_output=False)
                torch.testing.assert_close(logits[b:b + 1], masks, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(iou[b:b + 1], scores, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- coupled fine-tuning, end to end
@pytest.mark.slow
def test_coupled_trains_one_epoch_and_predicts_a_volume(env, tmp_path):
    common = ["--source", "SiteA", "--mode", "box", "--epochs", "1", "--batch-size", "2", "--num-workers", "0",
              "--device", "cpu", "--precision", "fp32", *env["train"]]
    assert run(train.main, ["900", "0", "-tr", "CoupledSAMTrainer", *common]) == 0
    folder = env["roots"]["results"] / DATASET / f"CoupledSAMTrainer__{PLANS}__box__src-SiteA"
    checkpoint = Checkpoint.load(folder / "fold_0" / "checkpoint_final.pth")
    assert checkpoint.network_config["network"] == "CoupledSAM" and checkpoint.epoch == 1
    assert checkpoint.config["trainer"] == "CoupledSAMTrainer" and checkpoint.has_training_state
    pretrained = read_state_dict(env["checkpoint"])
    mask_head = "prim.mask_decoder.output_upscaling.0.weight"
    assert not torch.equal(checkpoint.network[mask_head], pretrained[mask_head[len("prim."):]])  # it trained
    debug = json.loads((folder / "fold_0" / "debug.json").read_text(encoding="utf-8"))
    assert set(debug["parameter_counts"]) == {"prim.prompt_encoder", "prim.mask_decoder", "trainable", "total"}
    assert (folder / "fold_0" / "validation" / "summary.json").is_file()

    raw = env["roots"]["raw"] / DATASET
    case = "SiteB_Case00"
    out = tmp_path / "out"
    assert run(predict.main, ["-i", raw / "imagesTr" / f"{case}_0000.nii.gz", "-o", out, "-d", "900",
                              "-tr", "CoupledSAMTrainer", "--device", "cpu", "--save-probabilities",
                              *env["train"]]) == 0
    image = nib.load(str(raw / "imagesTr" / f"{case}_0000.nii.gz"))
    mask = nib.load(str(out / f"{case}.nii.gz"))
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    assert len(pd.read_csv(out / "quality.csv")) == image.shape[2]
    probabilities = np.load(out / f"{case}.npz")["probabilities"]

    # The same volume through segment_anything's own decoder with the trained weights, on the cached features.
    sam = sam_decoder(checkpoint.network, env["checkpoint"])
    arrays = cache.open_case(env["roots"]["preprocessed"] / DATASET / PLANS / case)
    neck = torch.from_numpy(np.asarray(arrays["neck"], np.float32))
    height, width = sam.prompt_encoder.input_image_size
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=None, boxes=torch.tensor([[0.0, 0.0, width, height]]), masks=None)
        logits = torch.cat([sam.mask_decoder(neck[s:s + 1], sam.prompt_encoder.get_dense_pe(), sparse, dense,
                                             multimask_output=False)[0] for s in range(len(neck))])
    expected = np.zeros((image.shape[2], 256, 256), np.float32)
    expected[np.asarray(arrays["meta"]["z"])] = torch.sigmoid(logits)[:, 0].numpy()
    orientation = plan_orientation(json.loads((folder / "plans.json").read_text(encoding="utf-8")))
    expected = resize_probabilities_back(expected, in_plane_shape(image.shape, 2, orientation))
    expected = from_slices(expected, 2, orientation)  # the cache holds slices as the plan orients them
    assert expected.std() > 0.01
    np.testing.assert_allclose(probabilities, expected, atol=0.03)   # the predictor runs bf16 on CPU
    assert ((probabilities > 0.5) == (expected > 0.5)).mean() > 0.98
    assert np.array_equal(np.asarray(mask.dataobj) > 0, probabilities > 0.5)
    assert isinstance(load_model(folder, device="cpu").networks[0], CoupledSAM)


# ---------------------------------------------------------------- zero-shot SAM, evaluated like any model
@pytest.mark.slow
def test_zero_shot_fold_is_evaluated_and_reported(env):
    assert run(train.main, ["900", "0", "-tr", "ZeroShotSAMTrainer", "--source", "SiteA", "--mode", "grid",
                            "--num-workers", "0", "--device", "cpu", *env["train"]]) == 0
    folder = env["roots"]["results"] / DATASET / f"ZeroShotSAMTrainer__{PLANS}__grid__src-SiteA"
    fold = folder / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and not (fold / "checkpoint_latest.pth").exists()
    checkpoint = Checkpoint.load(fold / "checkpoint_final.pth")
    assert checkpoint.epoch == 0 and checkpoint.config["epochs"] == 0
    pretrained = read_state_dict(env["checkpoint"])
    for key, value in checkpoint.network.items():   # the pretrained decoder, untouched
        assert torch.equal(value, pretrained[key[len("prim."):]]), key
    assert (fold / "validation" / "summary.json").is_file()

    assert run(evaluate_main, ["-d", "900", "--source", "SiteA", "--mode", "grid", "-tr", "ZeroShotSAMTrainer",
                               "--grid", "3", "--device", "cpu", *env["flags"]]) == 0
    per_case = pd.read_csv(folder / "evaluation" / "full" / "per_case.csv")
    held = json.loads((fold / "debug.json").read_text(encoding="utf-8"))["val_cases"]
    assert sorted(per_case["case"]) == sorted(["SiteB_Case00", "SiteB_Case01", *held])
    assert per_case["dice"].between(0, 1).all()
    assert (folder / "predictions" / "SiteB" / "SiteB_Case00.nii.gz").is_file()
    summary = json.loads((folder / "evaluation" / "full" / "summary.json").read_text(encoding="utf-8"))
    assert summary["trainer"] == "ZeroShotSAMTrainer"

    assert run(report_main, ["-d", "900", "-tr", "ZeroShotSAMTrainer", f"--results={env['roots']['results']}"]) == 0
    report = env["roots"]["results"] / DATASET / "report" / "ZeroShotSAMTrainer__grid__full"
    dice = pd.read_csv(report / "dice_matrix.csv")
    assert dice["source"].tolist() == ["SiteA"]
    assert "ZeroShotSAMTrainer" in (report / "report.md").read_text(encoding="utf-8")
