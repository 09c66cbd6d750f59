"""The toy runs several test files share (built once per session by conftest.py): SiteA of the toy dataset
embedded with the tiny SAM and trained in box mode, and untrained model folders for desam_predict."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from desam_pipeline.io.results_layout import CHECKPOINT_FINAL, MODEL_PLAN
from desam_pipeline.network import DeSAM
from desam_pipeline.training import train

from toy_data import TINY_TAPS

DATASET = "Dataset900_Toy"
PLANS = "DeSAMPlans_tiny"
MODEL = f"DeSAMTrainer__{PLANS}__box__src-SiteA"
# Six axial slices with foreground on two (z 2, 3); a foreground cache holds those: 2 slices per case.
SHAPE = (40, 36, 6)
# fp32, so one process and DDP agree to float precision (the CPU default, bf16, is tested in test_trainer)
COMMON = ["900", "0", "--source", "SiteA", "--mode", "box", "--epochs", "2", "--batch-size", "2",
          "--device", "cpu", "--precision", "fp32", "--seed", "7"]


def run_cli(root: Path, results: str, *extra: str) -> int:
    """desam_train with COMMON's flags on the cache under `root`, into `root/results`; its exit code."""
    with pytest.raises(SystemExit) as exit_info:
        train.main([*COMMON, *extra, "--preprocessed", str(root / "pre"), "--results", str(root / results)])
    return exit_info.value.code


def fold_dir(root: Path, results: str) -> Path:
    return root / results / DATASET / MODEL / "fold_0"


def final_state(folder: Path) -> dict:
    return torch.load(folder / CHECKPOINT_FINAL, weights_only=True)


def write_model_folder(results: Path, preprocessed: Path, checkpoint: Path, mode: str, folds: list[int]) -> Path:
    """An untrained model folder in the trainer's layout: different random PDMM weights per fold."""
    folder = results / DATASET / f"DeSAMTrainer__{PLANS}__{mode}__src-SiteA"
    folder.mkdir(parents=True)
    shutil.copyfile(preprocessed / DATASET / f"{PLANS}.json", folder / MODEL_PLAN)
    for name in ("dataset.json", "dataset_fingerprint.json"):
        shutil.copyfile(preprocessed / DATASET / name, folder / name)
    for fold in folds:
        torch.manual_seed(100 + fold)
        net = DeSAM.from_sam_checkpoint(checkpoint, "tiny", TINY_TAPS)
        (folder / f"fold_{fold}").mkdir()
        torch.save({"network": net.inference_state_dict(),
                    "network_config": {**net.config, "encoder": "tiny", "mode": mode}},
                   folder / f"fold_{fold}" / CHECKPOINT_FINAL)
    return folder
