"""Every default of a prediction, once: desam_predict, desam_evaluate and the trainer's final validation
read them from here, from the command line (`utilities.setting_flags`) and from Python alike.

The grid rule defaults to `reference`: in the accuracy benchmark it beat `top1` under the full protocol
on the same model (+0.05 and +0.04 mean unseen Dice, two runs) and tied under paper; `top1` predicts
about 3x faster on CPU and stays available.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from desam_pipeline.inference.grid_rules import GRID_RULES
from desam_pipeline.inference.postprocessing import MIN_OBJECT_ML, POSTPROCESSING
from desam_pipeline.io.results_layout import CHECKPOINT_NAMES
from desam_pipeline.utilities.errors import DesamError
from desam_pipeline.utilities.runtime import device_setting
from desam_pipeline.utilities.setting_flags import setting

DEFAULT_GRID = 9
DEFAULT_IOU_THRESHOLD = 0.5
# --iou-threshold calibrated: each fold's threshold from its checkpoint (the final validation's calibration).
CALIBRATED = "calibrated"
DEFAULT_GRID_RULE = "reference"
DEFAULT_POSTPROCESS = "largest"
DEFAULT_CHECKPOINT_NAME = "final"
# desam_predict's flags about files, which desam_evaluate lacks: it never skips a case or writes probabilities.
FILE_HANDLING = ("save_probabilities", "skip_existing")
# A voxel is foreground where the (fold-averaged) sigmoid probability exceeds this.
MASK_THRESHOLD = 0.5


def number_or_calibrated(text: str) -> float | str:
    """`--iou-threshold`: a number, or `calibrated` (argparse reports anything else as an invalid value)."""
    return CALIBRATED if text == CALIBRATED else float(text)


def check_grid(grid: int, rule: str, flag: str) -> None:
    """The one check of a grid size and rule, for prediction (`--grid`, `--grid-rule`) and the trainer's final
    validation (`--val-grid`, `--val-grid-rule`): a one-line DesamError naming the flag."""
    if grid < 1:
        raise DesamError(f"{flag} must be at least 1, got {grid}")
    if rule not in GRID_RULES:
        raise DesamError(f"unknown {flag}-rule {rule!r}; choose one of {', '.join(GRID_RULES)}")


@dataclass(frozen=True)
class PredictionSettings:
    """The choices a prediction depends on; `batch_size` None takes the plan's for the device."""
    device: str = device_setting()
    checkpoint_name: str = setting(
        DEFAULT_CHECKPOINT_NAME, choices=tuple(CHECKPOINT_NAMES),
        help="each fold's checkpoint: final or best (best moving-average validation Dice; default: %(default)s); "
             "recorded beside the results")
    checkpoint: str | None = setting(
        None, help="SAM checkpoint for the frozen encoder (default: the plan's; its sha256 must match)")
    batch_size: int | None = setting(None, type=int, help="slices per batch (default: the plan's)")
    iou_threshold: float | str = setting(
        DEFAULT_IOU_THRESHOLD, type=number_or_calibrated,
        help=f"grid mode: a slice is empty unless its best point's predicted IoU exceeds this (default: %(default)s); "
             f"{CALIBRATED}: each fold's threshold calibrated on its held-out source slices by desam_train's final "
             f"validation (stored in checkpoint_final.pth, at the validation's grid size)")
    grid: int = setting(DEFAULT_GRID, type=int, help="grid mode: K x K points per slice")
    grid_rule: str = setting(
        DEFAULT_GRID_RULE, choices=GRID_RULES,
        help="grid mode: reference = every point over the threshold through the network, NMS, clean-up, first "
             "mask, as the reference code; top1 = PDMM once on the best point's embedding (about 3x faster on "
             "CPU); default: %(default)s; recorded beside the results")
    postprocess: str = setting(
        DEFAULT_POSTPROCESS, choices=POSTPROCESSING,
        help="largest: keep the largest 3D connected component (default: %(default)s); fill: fill each slice's "
             f"holes; min_size: drop 3D components under {MIN_OBJECT_ML:g} ml; largest+fill, min_size+fill: both "
             "steps; paper: per slice fill holes and drop islands under 1000 px at 256x256, as the reference; none; "
             "recorded beside the results")
    modality: str | None = setting(
        None, help="the inputs' modality (e.g. CT or MR): a plan with a CT intensity window clips CT to it; default: "
                   "the model's dataset's, when it has one (desam_evaluate takes each site's from dataset.json)")
    save_probabilities: bool = setting(
        False, action="store_true", help="also write <case>.npz with the fold-averaged probabilities")
    skip_existing: bool = setting(False, flags=("--continue",), action="store_true",
                                  help="skip cases whose <case>.nii.gz already exists")

    def validate(self) -> "PredictionSettings":
        """Itself, or a one-line DesamError naming the flag that is out of range."""
        if self.checkpoint_name not in CHECKPOINT_NAMES:
            raise DesamError(f"unknown checkpoint name {self.checkpoint_name!r}; choose one of "
                             f"{', '.join(CHECKPOINT_NAMES)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise DesamError(f"--batch-size must be at least 1, got {self.batch_size}")
        if isinstance(self.iou_threshold, str):
            if self.iou_threshold != CALIBRATED:
                raise DesamError(f"--iou-threshold must be a finite number or {CALIBRATED}, got {self.iou_threshold!r}")
        elif not math.isfinite(self.iou_threshold):  # below 0 keeps every slice, 1 or more empties them all
            raise DesamError(f"--iou-threshold must be a finite number or {CALIBRATED}, got {self.iou_threshold}")
        check_grid(self.grid, self.grid_rule, "--grid")
        if self.postprocess not in POSTPROCESSING:
            raise DesamError(f"unknown --postprocess {self.postprocess!r}; choose one of {', '.join(POSTPROCESSING)}")
        return self

    def choices(self) -> dict:
        """What a result depends on (recorded beside it): not the device, batch size or file handling."""
        return {"checkpoint_name": self.checkpoint_name, "grid": self.grid, "iou_threshold": self.iou_threshold,
                "grid_rule": self.grid_rule, "postprocess": self.postprocess}
