"""A trained model folder read for prediction: its plan, dataset.json, mode and one network per fold.

A multi-structure model folder (one model folder per structure inside it, `results_layout.class_folders`) is
read as a Model whose `classes` hold one Model per structure (each with its `label_value`); so is a folder of
joint networks (`DeSAMJointTrainer`), each class Model running the shared network for its structure."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from desam_pipeline.data.plan_io import read_plan_file
from desam_pipeline.inference.settings import CALIBRATED, DEFAULT_CHECKPOINT_NAME, PredictionSettings
from desam_pipeline.io.atomic import read_json
from desam_pipeline.io.results_layout import CHECKPOINT_NAMES, MODEL_PLAN, Checkpoint, class_folders, \
    structure_calibration
from desam_pipeline.network.registry import rebuild_network
from desam_pipeline.utilities.errors import DesamError


@dataclass
class Model:
    """A trained model folder: its plan, dataset.json, mode and one network per fold (on one device)."""
    folder: Path
    plan: dict
    dataset_json: dict
    mode: str
    folds: list[str]
    networks: list[nn.Module] = field(repr=False)
    checkpoint_name: str = DEFAULT_CHECKPOINT_NAME
    label_value: int | None = None          # the structure this model segments (None: label > 0)
    classes: list["Model"] = field(default_factory=list, repr=False)  # one per structure, else empty
    gate_calibrations: list[dict | None] = field(default_factory=list)  # per fold, from its checkpoint

    @property
    def num_channels(self) -> int:
        return len(self.dataset_json.get("channel_names", {"0": ""})) or 1

    @property
    def structures(self) -> list["Model"]:
        """The single-structure models to run: the per-structure ones, else this one."""
        return self.classes or [self]

    def with_folds(self, folds: list[str]) -> "Model":
        """The same model restricted to some of its loaded folds (in each structure's model alike)."""
        networks = [self.networks[self.folds.index(f)] for f in folds] if self.networks else []
        calibrations = [self.gate_calibrations[self.folds.index(f)] for f in folds] if self.gate_calibrations else []
        return dataclasses.replace(self, folds=list(folds), networks=networks, gate_calibrations=calibrations,
                                   classes=[c.with_folds(folds) for c in self.classes])

    def fold_settings(self, index: int, settings: PredictionSettings) -> PredictionSettings:
        """`settings` for the network of fold `folds[index]`: `--iou-threshold calibrated` becomes that fold's
        calibrated threshold (a one-line error where the checkpoint has none, or where it was calibrated at
        another grid size: the best of more points scores higher)."""
        if settings.iou_threshold != CALIBRATED or self.mode != "grid":
            return settings
        path = self.folder / f"fold_{self.folds[index]}" / checkpoint_file(self.checkpoint_name)
        calibration = self.gate_calibrations[index] if index < len(self.gate_calibrations) else None
        if calibration is None:
            raise DesamError(f"{path}: no calibrated gate threshold (desam_train's final validation stores one in "
                             f"checkpoint_final.pth when its held-out slices have both kinds and some threshold beats "
                             f"chance; --val-only calibrates an older fold); pass a number to --iou-threshold")
        if int(calibration["grid"]) != settings.grid:
            raise DesamError(f"{path}: the gate was calibrated at a {calibration['grid']}x{calibration['grid']} grid; "
                             f"predict with --grid {calibration['grid']} or pass a number to --iou-threshold")
        return dataclasses.replace(settings, iou_threshold=float(calibration["threshold"]))


def structure_key(label_value: int | None) -> str:
    """How records name a structure's entry: its label value, "" for a single-structure model."""
    return "" if label_value is None else str(label_value)


def gate_thresholds(model: Model, settings: PredictionSettings) -> dict[str, list[float]]:
    """Per structure (`structure_key`), the IoU threshold each fold's network gates with under `settings`;
    raises the one-line error of `Model.fold_settings` before any prediction."""
    return {structure_key(m.label_value):
            [float(m.fold_settings(i, settings).iou_threshold) for i in range(len(m.folds))] for m in model.structures}


def stored_gate_thresholds(model_folder: str | os.PathLike, folds: list[str],
                           checkpoint_name: str = DEFAULT_CHECKPOINT_NAME) -> dict[str, list[float | None]]:
    """Per structure (`structure_key`), the calibrated gate threshold stored in each fold's checkpoint
    (None where it has none), read without building the networks: for reports of a `calibrated` evaluation."""
    folder = Path(model_folder)
    per_class = class_folders(folder) or {None: folder}
    found = {}
    for value, path in per_class.items():
        checkpoints = [Checkpoint.load(path / f"fold_{fold}" / checkpoint_file(checkpoint_name)) for fold in folds]
        joint = checkpoints[0].network_config.get("structures") if value is None and checkpoints else None
        for structure in joint or [value]:
            calibrations = [structure_calibration(c.gate_calibration, structure) for c in checkpoints]
            found[structure_key(structure)] = [c["threshold"] if c else None for c in calibrations]
    return found


def checkpoint_file(checkpoint_name: str) -> str:
    """The file name of a fold's `final` or `best` checkpoint."""
    if checkpoint_name not in CHECKPOINT_NAMES:
        raise DesamError(f"unknown checkpoint name {checkpoint_name!r}; choose one of {', '.join(CHECKPOINT_NAMES)}")
    return CHECKPOINT_NAMES[checkpoint_name]


def available_folds(model_folder: str | os.PathLike, checkpoint_name: str = DEFAULT_CHECKPOINT_NAME) -> list[str]:
    """Fold names (`0`, `1`, ..., `all`) that have the named checkpoint (in every structure's model folder of a
    multi-structure one); numbered folds first."""
    folder, name = Path(model_folder), checkpoint_file(checkpoint_name)
    per_class = class_folders(folder)
    if per_class:
        common = set.intersection(*(set(available_folds(f, checkpoint_name)) for f in per_class.values()))
        return sorted(common, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
    names = [c.name[len("fold_"):] for c in folder.glob("fold_*") if (c / name).is_file()]
    return sorted(names, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))


def default_folds(model_folder: str | os.PathLike, checkpoint_name: str = DEFAULT_CHECKPOINT_NAME) -> list[str]:
    """The cross-validation folds when there are any (as nnU-Net), else fold `all`."""
    folds = available_folds(model_folder, checkpoint_name)
    numbered = [f for f in folds if f.isdigit()]
    if not folds:
        raise DesamError(f"{model_folder}: no fold_*/{checkpoint_file(checkpoint_name)}; "
                         "train at least one fold to the end")
    return numbered or folds


def _model_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise DesamError(f"{path}: not found; is {folder} a DeSAM model folder (written by desam_train)?")
    return path


def load_fold_network(path: Path, plan: dict) -> tuple[nn.Module, str, dict | None]:
    """The trained network of one fold checkpoint (the class its network_config names), its mode and its gate
    calibration."""
    checkpoint = Checkpoint.load(path)
    config = checkpoint.network_config
    try:
        encoder, mode = config["encoder"], config["mode"]
    except KeyError as exc:
        raise DesamError(f"{path}: not a readable desam checkpoint (network_config lacks {exc})") from exc
    taps = config.get("tap_shapes")  # DeSAM's; CoupledSAM has no taps
    if encoder != plan["encoder"] or (taps is not None and taps != plan["tap_shapes"]):
        raise DesamError(f"{path}: trained for encoder {encoder}" + (f" (taps {taps})" if taps is not None else "")
                         + f", but the model folder's plan is {plan['encoder']} (taps {plan['tap_shapes']})")
    net = rebuild_network(checkpoint.network, config, path)
    return net.eval().requires_grad_(False), mode, checkpoint.gate_calibration


def load_model(model_folder: str | os.PathLike, folds: list[str] | None = None,
               device: torch.device | str = "cpu", checkpoint_name: str = DEFAULT_CHECKPOINT_NAME) -> Model:
    """Read a model folder's plans.json, dataset.json and the `final` (or `best`) checkpoints of `folds`
    (default: all)."""
    folder = Path(model_folder)
    if not folder.is_dir():
        raise DesamError(f"{folder}: model folder not found")
    per_class = class_folders(folder)
    if per_class:
        folds = [str(f) for f in folds] if folds else default_folds(folder, checkpoint_name)
        classes = [dataclasses.replace(load_model(path, folds, device, checkpoint_name), label_value=value)
                   for value, path in per_class.items()]
        first = classes[0]
        return Model(folder, first.plan, first.dataset_json, first.mode, folds, [], checkpoint_name, classes=classes)
    plan = read_plan_file(_model_file(folder, MODEL_PLAN))
    dataset_json = read_json(_model_file(folder, "dataset.json"))
    folds = [str(f) for f in folds] if folds else default_folds(folder, checkpoint_name)
    networks, modes, calibrations = [], set(), []
    for fold in folds:
        path = folder / f"fold_{fold}" / checkpoint_file(checkpoint_name)
        if not path.is_file():
            have = ", ".join(available_folds(folder, checkpoint_name)) or "none"
            raise DesamError(f"{path}: not found (folds with a {checkpoint_name} checkpoint: {have})")
        net, mode, calibration = load_fold_network(path, plan)
        networks.append(net.to(device))
        modes.add(mode)
        calibrations.append(calibration)
    if len(modes) != 1:
        raise DesamError(f"{folder}: folds {', '.join(folds)} were trained in different modes ({sorted(modes)})")
    model = Model(folder, plan, dataset_json, modes.pop(), folds, networks, checkpoint_name,
                  gate_calibrations=calibrations)
    joint = {str(net.config.get("structures")) for net in networks}
    if len(joint) != 1:
        raise DesamError(f"{folder}: folds {', '.join(folds)} segment different structures ({sorted(joint)})")
    values = networks[0].config.get("structures")
    if values:
        model.classes = [dataclasses.replace(model, label_value=value,
                                             networks=[net.for_structure(value) for net in networks],
                                             gate_calibrations=[structure_calibration(c, value) for c in calibrations])
                         for value in values]
    return model
