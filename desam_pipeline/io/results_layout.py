"""The results tree's conventions, in one place: model folder names and the fold checkpoint schema.

    <results>/<Dataset>/<TrainerClass>__<plans>__<mode>__src-<SITES|ALL>/fold_<k>/checkpoint_*.pth

A dataset with several structures (a plan with `label_classes`) gets one DeSAM per structure, each a
complete model folder of its own inside the model folder, named after the class value:

    <model folder>/{plans.json, dataset.json, label_<value>/{plans.json, dataset.json, fold_<k>/checkpoint_*.pth}}

The trainer writes both, the predictor, `desam_evaluate` and `desam_report` read them; nothing
else builds or parses a model folder name or a checkpoint's keys.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from desam_pipeline.io.atomic import save_torch
from desam_pipeline.io.safe_names import check_name
from desam_pipeline.utilities.errors import DesamError

DEFAULT_TRAINER = "DeSAMTrainer"
MODEL_PLAN = "plans.json"  # the plan's copy in a model folder (it stands alone)
CHECKPOINT_FINAL = "checkpoint_final.pth"
CHECKPOINT_LATEST = "checkpoint_latest.pth"
CHECKPOINT_BEST = "checkpoint_best.pth"
# nnU-Net's order for `-c`: final, else latest, else best.
CHECKPOINTS = (CHECKPOINT_FINAL, CHECKPOINT_LATEST, CHECKPOINT_BEST)
# Which checkpoint of a fold predicts: the final one (default) or the best moving-average validation Dice.
CHECKPOINT_NAMES = {"final": CHECKPOINT_FINAL, "best": CHECKPOINT_BEST}
# A fold converted from a model trained by the reference code (desam_import_official): the source file and hash.
IMPORT_RECORD = "imported_from.json"
CLASS_PREFIX = "label_"
_FOLDER = re.compile(r"^(?P<trainer>[A-Za-z_][A-Za-z0-9_]*?)__(?P<plans>.+)__(?P<mode>[A-Za-z0-9]+)"
                     r"__(?P<source>src-.+)$")


def source_key(sources: list[str] | None) -> str:
    """`src-ALL` when no sources are selected, else `src-` + the sorted site names joined by '+'."""
    if not sources:
        return "src-ALL"
    return "src-" + "+".join(sorted(check_name(site, "site name") for site in set(sources)))


@dataclass(frozen=True)
class ModelFolderName:
    """The four parts of a model folder name; `source` is the splits' key (`src-<SITES>` or `src-ALL`)."""
    trainer: str
    plans: str
    mode: str
    source: str

    @property
    def name(self) -> str:
        return f"{self.trainer}__{self.plans}__{self.mode}__{self.source}"

    @property
    def sites(self) -> str:
        """The source part without its `src-` prefix (`RUNMC`, `SiteA+SiteB`, `ALL`)."""
        return self.source[len("src-"):]


def model_folder_name(trainer: str, plans_name: str, mode: str, sources: list[str] | None) -> str:
    """`<trainer>__<plans>__<mode>__src-<SITES|ALL>`: the folder desam_train writes for these settings (each
    part a plain name, see safe_names)."""
    parts = (check_name(trainer, "trainer name"), check_name(plans_name, "plans name"), check_name(mode, "mode"))
    return ModelFolderName(*parts, source_key(sources)).name


def parse_model_folder_name(name: str) -> ModelFolderName | None:
    """The parts of a model folder name, None for any other folder name."""
    match = _FOLDER.match(name)
    return ModelFolderName(**match.groupdict()) if match else None


def model_folders(results_dataset_dir: str | os.PathLike) -> list[tuple[Path, ModelFolderName]]:
    """Every model folder of a results dataset folder (any trainer), sorted by name."""
    folder = Path(results_dataset_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in sorted(folder.iterdir()):
        parsed = parse_model_folder_name(child.name)
        if parsed is not None and child.is_dir():
            found.append((child, parsed))
    return found


def find_model_folder(results_dataset_dir: str | os.PathLike, sources: list[str] | None = None,
                      mode: str | None = None, plans_name: str | None = None, trainer: str | None = None) -> Path:
    """The single model folder of a dataset (any trainer class) matching the given source sites, mode,
    plans name and trainer.

    Left-out criteria match anything; none or several matches are a one-line error listing them.
    """
    folder = Path(results_dataset_dir)
    if not folder.is_dir():
        raise DesamError(f"{folder}: no results for this dataset; train a model first (desam_train)")
    key = source_key(sources) if sources else None
    models = model_folders(folder)
    found = [child for child, name in models
             if plans_name in (None, name.plans) and mode in (None, name.mode) and key in (None, name.source)
             and trainer in (None, name.trainer)]
    if len(found) == 1:
        return found[0]
    available = ", ".join(child.name for child, _ in models) or "none"
    if not found:
        raise DesamError(f"{folder}: no model folder for source {sources or 'any'}, mode {mode or 'any'}, "
                         f"plans {plans_name or 'any'}, trainer {trainer or 'any'} (available: {available})")
    raise DesamError(f"{folder}: several model folders match ({', '.join(c.name for c in found)}); "
                     f"choose one with --source, --mode, --plans-name or -tr, or pass -m")


def class_folder(model_folder: str | os.PathLike, value: int) -> Path:
    """The model folder of the structure with label `value` inside a multi-structure model folder."""
    return Path(model_folder) / f"{CLASS_PREFIX}{int(value)}"


def class_folders(model_folder: str | os.PathLike) -> dict[int, Path]:
    """label value -> its structure's model folder, sorted by value; empty for a single-structure model folder."""
    folder = Path(model_folder)
    if not folder.is_dir():
        return {}
    found = {int(child.name[len(CLASS_PREFIX):]): child for child in folder.iterdir()
             if child.is_dir() and child.name.startswith(CLASS_PREFIX) and child.name[len(CLASS_PREFIX):].isdigit()}
    return dict(sorted(found.items()))


@dataclass
class Checkpoint:
    """One fold checkpoint: what prediction needs (`network`, `network_config`) and the training state.

    `network_config` records the network class (`network`, absent in checkpoints of DeSAM written
    before there were others), its constructor settings, the encoder and the mode. The training
    state (optimizer and onward) is None in a checkpoint written for prediction only. `gate_calibration`
    (grid mode, checkpoint_final.pth only) is the gate threshold the final validation found on the held-out
    source slices (`utilities.detection.calibrate_gate`, with the grid it was measured at); `--iou-threshold
    calibrated` predicts with it. None: not validated, or the held-out slices could not calibrate it. A joint
    network (several structures) stores {"structures": {label value: calibration or None}}
    (`stored_calibration`, read back per structure with `structure_calibration`).
    """
    network: dict[str, torch.Tensor]
    network_config: dict
    config: dict = field(default_factory=dict)
    plan_sha256: str | None = None
    epoch: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)
    best_ema: float = -math.inf
    optimizer: dict | None = None
    scaler: dict | None = None
    rng: list[dict] | None = None
    sampler: dict | None = None
    gate_calibration: dict | None = None

    @property
    def has_training_state(self) -> bool:
        return None not in (self.optimizer, self.scaler, self.rng)

    def save(self, target: str | os.PathLike) -> None:
        """Write atomically as a plain dict of tensors and builtins (loadable with weights_only=True); a full
        disk is a plain OSError naming the file, not a zip error."""
        save_torch({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, target)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Checkpoint":
        """Read a checkpoint on CPU; an unreadable file or one without network weights is a one-line error."""
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DesamError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(content, dict) or not {"network", "network_config"} <= set(content):
            raise DesamError(f"{path}: not a desam checkpoint (no network weights and network_config)")
        return cls(**{k: v for k, v in content.items() if k in known})


def stored_calibration(per_structure: dict[int | None, dict | None]) -> dict | None:
    """What a checkpoint stores as `gate_calibration`: the one structure's calibration, or a joint network's
    per structure under "structures" (label values as strings)."""
    if len(per_structure) == 1:
        return next(iter(per_structure.values()))
    return {"structures": {str(value): calibration for value, calibration in per_structure.items()}}


def structure_calibration(stored: dict | None, value: int | None) -> dict | None:
    """The calibration of structure `value` in a checkpoint's `gate_calibration` (None: that of a network of one
    structure)."""
    if stored is None or "structures" not in stored:
        return stored
    return stored["structures"].get(str(value))
