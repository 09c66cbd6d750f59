"""Every default of desam_evaluate, once: the prediction settings it predicts with, and what it scores.

The command line (`utilities.setting_flags`) and `evaluate_model` from Python read the same defaults,
so a call gives the same masks and scores either way.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from desam_pipeline.inference.settings import PredictionSettings
from desam_pipeline.io.results_layout import DEFAULT_TRAINER
from desam_pipeline.utilities.errors import DesamError
from desam_pipeline.utilities.metrics import DEFAULT_NSD_TOLERANCE_MM
from desam_pipeline.utilities.setting_flags import setting
from evaluation.tables import PROTOCOLS

DEFAULT_PROTOCOLS = ("full",)


@dataclass(frozen=True)
class EvaluationSettings:
    """Which model and folds to evaluate, under which protocols, predicted with `prediction`."""
    prediction: PredictionSettings = field(default_factory=PredictionSettings)
    trainer: str = setting(
        DEFAULT_TRAINER, flags=("-tr", "--trainer"), metavar="NAME",
        help="the trainer class that trained the model (default %(default)s; e.g. CoupledSAMTrainer, "
             "ZeroShotSAMTrainer)")
    model_folder: str | None = setting(
        None, metavar="NAME", help="score the predictions of a results folder made outside desam (e.g. by "
                                   "desam_nnunet_baseline) as they are, without desam's predictor")
    protocols: tuple[str, ...] = setting(
        DEFAULT_PROTOCOLS, flags=("--protocol",), nargs="+", choices=sorted(PROTOCOLS),
        help="full: every slice in original geometry (default); paper: the reference protocol "
             "(foreground slices only, 256x256, 50-px border zeroed); both may be given")
    folds: tuple[str, ...] | None = setting(
        None, flags=("-f", "--folds"), nargs="+",
        help="folds to use (default: every numbered fold with the chosen checkpoint, else 'all')")
    plans_name: str | None = setting(None, help="the model's plan (default: the dataset's only plan)")
    nsd_tolerance: float = setting(DEFAULT_NSD_TOLERANCE_MM, type=float, metavar="MM",
                                   help="tolerance of the normalised surface Dice in mm (default: %(default)s)")

    def validate(self) -> "EvaluationSettings":
        """Itself, or a one-line DesamError naming the setting that is out of range."""
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise DesamError(f"unknown protocol(s) {unknown or 'none'}; choose from {', '.join(sorted(PROTOCOLS))}")
        if not self.nsd_tolerance >= 0:
            raise DesamError(f"--nsd-tolerance must be >= 0, got {self.nsd_tolerance}")
        self.prediction.validate()
        return self
