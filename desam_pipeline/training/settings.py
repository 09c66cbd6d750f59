"""Every hyper-parameter of a training run and its default, once: `desam_train` makes its flags from
`TrainingSettings` (`utilities.setting_flags`), and `DeSAMTrainer` takes the settings object.

The defaults are the paper's where it states them (Adam, 1e-4 with poly decay); the checkpoints record
the settings, and `-c` resumes only a run with the same `RESUME_KEYS`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from desam_pipeline.data.prompts import MODES
from desam_pipeline.data.slice_data import DEFAULT_LOADER_TIMEOUT_S, SAMPLINGS
from desam_pipeline.data.slice_selection import SLICE_MODES
from desam_pipeline.inference.grid_rules import GRID_RULES
from desam_pipeline.inference.settings import DEFAULT_GRID, DEFAULT_GRID_RULE, check_grid
from desam_pipeline.network.pdmm import DEFAULT_LAYOUT, LAYOUTS
from desam_pipeline.training.losses import DEFAULT_LOSS, LOSS_WEIGHTS, LOSSES
from desam_pipeline.utilities.errors import DesamError
from desam_pipeline.utilities.runtime import DEVICES, PRECISIONS, device_setting
from desam_pipeline.utilities.setting_flags import setting

# Settings that must match for `-c` to continue the same run exactly (with the trainer's plans_name, fold, sources).
RESUME_KEYS = ("mode", "epochs", "batch_size", "lr", "prim_lr_scale", "loss", "loss_weights", "seed", "plans_name",
               "fold", "sources", "pdmm", "augmented_views", "train_slices", "sampling", "label", "hard_negatives")
# What checkpoints written before a key existed ran with.
RESUME_DEFAULTS = {"loss": "paper", "pdmm": "desam", "augmented_views": True, "train_slices": "all",
                   "sampling": "slices", "label": None, "hard_negatives": 0.0, "prim_lr_scale": 1.0}


@dataclass(frozen=True)
class TrainingSettings:
    """The hyper-parameters of one training run; `loss_weights` None takes the `loss` setting's."""
    device: str = device_setting()
    mode: str = setting("grid", choices=MODES,
                        help="grid: one sampled point per slice + IoU loss (DeSAM-P); box: whole-image box (DeSAM-B)")
    epochs: int = setting(50, type=int)
    batch_size: int = setting(8, type=int, help="global batch size (split over DDP ranks)")
    lr: float = setting(1e-4, type=float, help="initial Adam learning rate (poly decay 0.9)")
    prim_lr_scale: float = setting(
        1.0, type=float, metavar="S",
        help="PRIM's learning rate (SAM's pretrained decoder transformer and IoU head) as a multiple of --lr; PDMM "
             "and the rest train at --lr (default: %(default)s, one rate for all, as the reference); recorded in "
             "the checkpoints")
    loss: str = setting(
        DEFAULT_LOSS, choices=LOSSES,
        help="batch: Dice pooled over the batch + BCE + squared-error IoU, weights (1, 1, 10), so empty slices' "
             "false positives are pushed down and the IoU head is calibrated; "
             "paper: soft Dice per sample + BCE + L1 IoU, weights (1, 1, 10) as the paper states; reference: what the "
             "reference code optimises, squared-denominator Dice (MONAI, smoothing 1e-5) + 1 x L1 IoU, no "
             "cross-entropy; default: %(default)s; recorded in the checkpoints")
    loss_weights: tuple[float, float, float] | None = setting(
        None, type=float, nargs=3, metavar=("DICE", "BCE", "IOU"),
        help=f"loss weights (default: the --loss setting's, {LOSS_WEIGHTS[DEFAULT_LOSS]} for {DEFAULT_LOSS}; "
             "IoU unused in box mode)")
    pdmm: str = setting(
        DEFAULT_LAYOUT, choices=LAYOUTS,
        help="PDMM layout: desam (biases in the SE gates and the 1x1 head, so they can learn; tied with reference "
             "in the accuracy benchmark) or reference (no biases, as the reference code: every SE gate is a fixed "
             "0.5); default: %(default)s; recorded in the checkpoints")
    seed: int = setting(0, type=int)
    augmented_views: bool = setting(
        True, flags=("--no-augmented-views",), action="store_false",
        help="train on the original slices only, ignoring augmented views in the cache (one cache with views then "
             "serves runs with and without them)")
    train_slices: str = setting(
        "all", choices=SLICE_MODES,
        help="which cached slices train (and validate per epoch), by the embedding's rules: all (every cached "
             "slice), foreground_margin or foreground (default: %(default)s); a cache of every slice can so train on "
             "the slices a default plan would cache; recorded in the checkpoints")
    sampling: str = setting(
        "balanced", choices=SAMPLINGS,
        help="grid mode: balanced = clicks on and off the object 1:1 whatever share of the slices is empty; "
             "slices = every slice once, its click on or off 1:1 (default: %(default)s); recorded in the checkpoints")
    hard_negatives: float = setting(
        0.5, type=float, metavar="P",
        help="grid mode: the share of clicks off the object drawn where the object lies in the case's other slices "
             "(its footprint), the rest over the whole background (default: %(default)s; 0: the reference's uniform "
             "draw); without them the IoU head learns where the object usually is rather than whether it is there; "
             "recorded in the checkpoints")
    label: int | None = setting(
        None, type=int, metavar="VALUE",
        help="a dataset with several structures: train the DeSAM of the structure with this label value (target "
             "label == VALUE), into <model folder>/label_<VALUE>/; one run per structure")
    val_grid: int = setting(
        DEFAULT_GRID, type=int, metavar="K",
        help="grid mode: K x K points per slice in the final validation (default: %(default)s, desam_predict's); "
             "recorded in validation/summary.json")
    val_grid_rule: str = setting(
        DEFAULT_GRID_RULE, choices=GRID_RULES,
        help="grid mode: the grid rule of the final validation (default: %(default)s, desam_predict's); recorded "
             "in validation/summary.json")
    precision: str = setting("auto", choices=PRECISIONS,
                             help="autocast precision (default auto: fp16 with loss scaling on CUDA, bf16 on CPU)")
    num_workers: int = setting(2, type=int, help="data loader worker processes (0: load in the training process)")
    loader_timeout_s: float = DEFAULT_LOADER_TIMEOUT_S

    def local_batch_size(self, world_size: int) -> int:
        """Each of `world_size` processes' share of the global batch; a DesamError when it does not divide."""
        if self.batch_size % world_size:
            raise DesamError(f"batch size {self.batch_size} does not divide over {world_size} processes; "
                             f"use a multiple of {world_size}")
        return self.batch_size // world_size

    def validate(self, min_epochs: int = 1) -> "TrainingSettings":
        """Itself, or a one-line DesamError naming the setting that is out of range."""
        for name, value, known in (("mode", self.mode, MODES), ("loss", self.loss, LOSSES),
                                   ("PDMM layout", self.pdmm, LAYOUTS), ("train slices", self.train_slices, SLICE_MODES),
                                   ("sampling", self.sampling, SAMPLINGS), ("precision", self.precision, PRECISIONS),
                                   ("device", self.device, DEVICES)):
            if value not in known:
                raise DesamError(f"unknown {name} {value!r}; choose one of {', '.join(known)}")
        if not 0.0 <= self.hard_negatives <= 1.0:
            raise DesamError(f"hard negatives ({self.hard_negatives}) must be a probability in [0, 1]")
        check_grid(self.val_grid, self.val_grid_rule, "--val-grid")
        if not (math.isfinite(self.prim_lr_scale) and self.prim_lr_scale > 0):
            raise DesamError(f"--prim-lr-scale must be a number > 0, got {self.prim_lr_scale}")
        if self.epochs < min_epochs or self.batch_size < 1 or not self.lr > 0:
            raise DesamError(f"epochs ({self.epochs}) must be >= {min_epochs}, batch size ({self.batch_size}) >= 1 "
                             f"and lr ({self.lr}) > 0")
        if self.num_workers < 0:
            raise DesamError(f"--num-workers must be 0 (load in this process) or more, got {self.num_workers}")
        weights = self.loss_weights
        if weights is not None and (len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights)):
            raise DesamError(f"--loss-weights must be three finite numbers >= 0 (Dice, BCE, IoU), got {weights}")
        return self

    def resolved_loss_weights(self) -> tuple[float, float, float]:
        """(Dice, BCE, IoU) weights: the given ones, else the loss setting's; box mode has no IoU loss."""
        weights = LOSS_WEIGHTS[self.loss] if self.loss_weights is None else tuple(map(float, self.loss_weights))
        return weights if self.mode == "grid" else (weights[0], weights[1], 0.0)


def resume_differences(saved: dict, current: dict, saved_plan: str | None = None,
                       plan: str | None = None) -> list[str]:
    """`key old -> new` for each of RESUME_KEYS where a checkpoint's recorded config differs from this run's
    (keys a checkpoint predates count as RESUME_DEFAULTS; lists and tuples compare equal), and the plan's
    sha256 when the checkpoint recorded one that differs from this run's `plan`."""
    def comparable(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    old = {k: saved.get(k, RESUME_DEFAULTS.get(k)) for k in RESUME_KEYS}
    differ = [f"{k} {old[k]!r} -> {current[k]!r}" for k in RESUME_KEYS if comparable(old[k]) != comparable(current[k])]
    if saved_plan is not None and plan is not None and saved_plan != plan:
        differ.append(f"plan sha256 {saved_plan[:12]}... -> {plan[:12]}...")
    return differ
