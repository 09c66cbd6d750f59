"""The SAM baselines as trainers: DeSAM's data, prompts, schedule and losses on SAM's own decoder.

`CoupledSAMTrainer` fine-tunes SAM's complete mask decoder (the coupled design DeSAM decouples),
predicting through the decoder's mask head. `ZeroShotSAMTrainer` trains zero epochs: its fold holds
the pretrained decoder as checkpoint_final.pth and its validation, so SAM in automatic mode (grid
or whole box) is predicted, evaluated and reported like any trained model.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from desam_pipeline.network import CoupledSAM
from desam_pipeline.network.pdmm import DEFAULT_LAYOUT
from desam_pipeline.training.settings import TrainingSettings
from desam_pipeline.training.trainer import DeSAMTrainer
from desam_pipeline.utilities.errors import DesamError


class CoupledSAMTrainer(DeSAMTrainer):
    """DeSAMTrainer on `CoupledSAM`: prompt encoder frozen, the whole mask decoder trained. It has no PDMM."""

    def __init__(self, preprocessed_dir: Path, results_dir: Path, plans_name: str, fold: int | str,
                 sources: list[str] | None = None, settings: TrainingSettings | None = None) -> None:
        if settings is not None and settings.pdmm != DEFAULT_LAYOUT:
            raise DesamError(f"{type(self).__name__} has no PDMM; --pdmm applies to DeSAM trainers only")
        super().__init__(preprocessed_dir, results_dir, plans_name, fold, sources, settings)

    def build_network(self) -> CoupledSAM:
        return CoupledSAM.from_sam_checkpoint(self.plan["checkpoint"], self.plan["encoder"])


class ZeroShotSAMTrainer(CoupledSAMTrainer):
    """The pretrained SAM decoder, untrained: zero epochs whatever `epochs` says, then the final validation."""

    MIN_EPOCHS = 0

    def __init__(self, preprocessed_dir: Path, results_dir: Path, plans_name: str, fold: int | str,
                 sources: list[str] | None = None, settings: TrainingSettings | None = None) -> None:
        settings = dataclasses.replace(settings or TrainingSettings(), epochs=0)
        super().__init__(preprocessed_dir, results_dir, plans_name, fold, sources, settings)
