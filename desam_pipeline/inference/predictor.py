"""Segment NIfTI volumes with a trained DeSAM model folder, keeping each input's geometry exactly.

Per volume: the embed stage's preprocessing, the frozen SAM encoder over every slice in batches
(or the embedding cache of the same plan where it holds the slice), each fold's decoder through
`slice_prediction.predict_slices`, fold-averaged sigmoid probabilities resized back to the slice's own
grid, threshold 0.5, optional post-processing. Outputs per case: `<case>.nii.gz` (uint8 {0, 1},
the input's affine and header), `quality/<case>.csv` (PRIM's predicted IoU per slice), and with
`save_probabilities` `<case>.npz`; the mask is written last, so its presence marks a finished case.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from desam_pipeline.data.orientation import from_slices, in_plane_shape, plan_orientation
from desam_pipeline.data.plan_io import REQUIRED_KEYS
from desam_pipeline.data.preprocessing import preprocess_volume, resize_probabilities_back
from desam_pipeline.inference import slice_prediction
from desam_pipeline.inference.features import CacheIndex, SliceEncoder, cache_folder_of, resolve_sam_checkpoint
from desam_pipeline.inference.grid_rules import GRID_RULES
from desam_pipeline.inference.inputs import CaseInput, discover_inputs, read_case_volume
from desam_pipeline.inference.outputs import (QUALITY_COLUMNS, QUALITY_DIR, merge_quality, output_path,
                                              probabilities_path, quality_path, save_probabilities,
                                              write_case_quality)
from desam_pipeline.inference.postprocessing import postprocess
from desam_pipeline.io.atomic import read_json
from desam_pipeline.io.nifti_io import save_like
from desam_pipeline.io.results_layout import CHECKPOINT_FINAL, CHECKPOINT_NAMES, Checkpoint, model_folders, source_key
from desam_pipeline.network import CoupledSAM, DeSAM
from desam_pipeline.utilities.errors import DesamError
from desam_pipeline.utilities.runtime import resolve_precision

# The prediction's inputs, features and outputs live in prediction_inputs / prediction_features /
# prediction_outputs; their public names stay reachable here for callers of the predictor.
__all__ = ["CHECKPOINT_FILE", "CHECKPOINT_NAMES", "QUALITY_COLUMNS", "QUALITY_DIR", "CacheIndex", "CaseInput",
           "CaseResult", "Model", "Predictor", "Settings", "SliceEncoder", "available_folds", "build_predictor",
           "cache_folder_of", "checkpoint_file", "decode", "default_folds", "discover_inputs", "feature_batches",
           "find_model_folder", "load_fold_network", "load_model", "make_settings", "merge_quality", "output_path",
           "predict_volume", "quality_path", "read_case_volume", "resolve_sam_checkpoint"]

CHECKPOINT_FILE = CHECKPOINT_FINAL


# ---------------------------------------------------------------- model folder
@dataclass
class Model:
    """A trained model folder: its plan, dataset.json, mode and one network per fold (on one device)."""
    folder: Path
    plan: dict
    dataset_json: dict
    mode: str
    folds: list[str]
    networks: list[DeSAM | CoupledSAM] = field(repr=False)
    checkpoint_name: str = "final"

    @property
    def num_channels(self) -> int:
        return len(self.dataset_json.get("channel_names", {"0": ""})) or 1


def find_model_folder(results_dataset_dir: str | os.PathLike, sources: list[str] | None = None,
                      mode: str | None = None, plans_name: str | None = None, trainer: str | None = None) -> Path:
    """The single model folder of a dataset (any trainer class) matching the given source sites, mode,
    plans name and trainer.

    Left-out criteria match anything; none or several matches are a one-line error listing them.
    """
    folder = Path(results_dataset_dir)
    if not folder.is_dir():
        raise DesamError(f"{folder}: no results for this dataset; train a model first (desam_train)")
    source_key = source_key(sources) if sources else None
    models = model_folders(folder)
    found = [child for child, name in models
             if plans_name in (None, name.plans) and mode in (None, name.mode) and source_key in (None, name.source)
             and trainer in (None, name.trainer)]
    if len(found) == 1:
        return found[0]
    available = ", ".join(child.name for child, _ in models) or "none"
    if not found:
        raise DesamError(f"{folder}: no model folder for source {sources or 'any'}, mode {mode or 'any'}, "
                         f"plans {plans_name or 'any'}, trainer {trainer or 'any'} (available: {available})")
    raise DesamError(f"{folder}: several model folders match ({', '.join(c.name for c in found)}); "
                     f"choose one with --source, --mode, --plans-name or -tr, or pass -m")


def checkpoint_file(checkpoint_name: str) -> str:
    """The file name of a fold's `final` or `best` checkpoint."""
    if checkpoint_name not in CHECKPOINT_NAMES:
        raise DesamError(f"unknown checkpoint name {checkpoint_name!r}; choose one of {', '.join(CHECKPOINT_NAMES)}")
    return CHECKPOINT_NAMES[checkpoint_name]


def available_folds(model_folder: str | os.PathLike, checkpoint_name: str = "final") -> list[str]:
    """Fold names (`0`, `1`, ..., `all`) that have the named checkpoint; numbered folds first."""
    folder, name = Path(model_folder), checkpoint_file(checkpoint_name)
    names = [c.name[len("fold_"):] for c in folder.glob("fold_*") if (c / name).is_file()]
    return sorted(names, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))


def default_folds(model_folder: str | os.PathLike, checkpoint_name: str = "final") -> list[str]:
    """The cross-validation folds when there are any (as nnU-Net), else fold `all`."""
    folds = available_folds(model_folder, checkpoint_name)
    numbered = [f for f in folds if f.isdigit()]
    if not folds:
        raise DesamError(f"{model_folder}: no fold_*/{checkpoint_file(checkpoint_name)}; "
                         "train at least one fold to the end")
    return numbered or folds


def _read_model_json(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        raise DesamError(f"{path}: not found; is {folder} a DeSAM model folder (written by desam_train)?")
    try:
        return read_json(path)
    except ValueError as exc:
        raise DesamError(f"{path}: invalid JSON ({exc})") from exc


def load_fold_network(path: Path, plan: dict) -> tuple[DeSAM | CoupledSAM, str]:
    """The trained network of one fold checkpoint (the class its network_config names), and its mode."""
    checkpoint = Checkpoint.load(path)
    config, state = checkpoint.network_config, checkpoint.network
    network = config.get("network", DeSAM.__name__)
    if network not in (DeSAM.__name__, CoupledSAM.__name__):
        raise DesamError(f"{path}: network {network!r} is not one the predictor can rebuild "
                         f"({DeSAM.__name__}, {CoupledSAM.__name__})")
    if network == CoupledSAM.__name__:
        if config.get("encoder") != plan["encoder"]:
            raise DesamError(f"{path}: trained for encoder {config.get('encoder')}, but the model folder's plan "
                             f"is {plan['encoder']}")
        return CoupledSAM.from_inference_state(state, config, source=path).eval().requires_grad_(False), config["mode"]
    try:
        encoder, tap_shapes, mode = config["encoder"], config["tap_shapes"], config["mode"]
    except Exception as exc:
        raise DesamError(f"{path}: not a readable DeSAM checkpoint ({type(exc).__name__}: {exc})") from exc
    if encoder != plan["encoder"] or tap_shapes != plan["tap_shapes"]:
        raise DesamError(f"{path}: trained for encoder {encoder} (taps {tap_shapes}), "
                         f"but the model folder's plan is {plan['encoder']} (taps {plan['tap_shapes']})")
    net = DeSAM.from_inference_state(state, config, source=path)
    return net.eval().requires_grad_(False), mode


def load_model(model_folder: str | os.PathLike, folds: list[str] | None = None,
               device: torch.device | str = "cpu", checkpoint_name: str = "final") -> Model:
    """Read a model folder's plans.json, dataset.json and the `final` (or `best`) checkpoints of `folds`
    (default: all)."""
    folder = Path(model_folder)
    if not folder.is_dir():
        raise DesamError(f"{folder}: model folder not found")
    plan = _read_model_json(folder, "plans.json")
    missing = [k for k in REQUIRED_KEYS if k not in plan]
    if missing:
        raise DesamError(f"{folder / 'plans.json'}: plan lacks keys {', '.join(missing)}")
    dataset_json = _read_model_json(folder, "dataset.json")
    folds = [str(f) for f in folds] if folds else default_folds(folder, checkpoint_name)
    networks, modes = [], set()
    for fold in folds:
        path = folder / f"fold_{fold}" / checkpoint_file(checkpoint_name)
        if not path.is_file():
            have = ", ".join(available_folds(folder, checkpoint_name)) or "none"
            raise DesamError(f"{path}: not found (folds with a {checkpoint_name} checkpoint: {have})")
        net, mode = load_fold_network(path, plan)
        networks.append(net.to(device))
        modes.add(mode)
    if len(modes) != 1:
        raise DesamError(f"{folder}: folds {', '.join(folds)} were trained in different modes ({sorted(modes)})")
    return Model(folder, plan, dataset_json, modes.pop(), folds, networks, checkpoint_name)


# ---------------------------------------------------------------- prediction
@dataclass
class Settings:
    """Run-time choices of a prediction (flags of desam_predict)."""
    device: torch.device
    precision: str
    batch_size: int
    grid: int = 9
    iou_threshold: float = 0.5
    grid_rule: str = "top1"
    postprocess: str = "none"
    save_probabilities: bool = False
    skip_existing: bool = False


def make_settings(plan: dict, device: torch.device, batch_size: int | None = None, **choices) -> Settings:
    """Settings with the plan's precision and batch size for `device` unless overridden.

    The precision (autocast) serves the encoder and the decoders alike: with bf16 on CPU the
    decoders' convolutions run about twice as fast as in fp32.
    """
    precision = resolve_precision(plan["precision"][device.type], device)
    batch = int(batch_size if batch_size is not None else plan["batch_size"][device.type])
    if batch < 1:
        raise DesamError(f"--batch-size must be at least 1, got {batch}")
    if choices.get("grid", 1) < 1:
        raise DesamError(f"--grid must be at least 1, got {choices['grid']}")
    if choices.get("grid_rule", "top1") not in GRID_RULES:
        raise DesamError(f"unknown --grid-rule {choices['grid_rule']!r}; choose one of {', '.join(GRID_RULES)}")
    return Settings(device=device, precision=precision, batch_size=batch, **choices)


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def feature_batches(slices: np.ndarray, encoder: SliceEncoder, cached: dict, rows: dict[int, int],
                    batch_size: int, case: str) -> Iterator[tuple[list[int], torch.Tensor, list[torch.Tensor]]]:
    """(slice indices, neck, taps) per batch: cached slices read from the cache, the others encoded."""
    for chunk in _chunks(sorted(rows), batch_size):
        index = [rows[z] for z in chunk]
        yield chunk, torch.from_numpy(cached["neck"][index]), [torch.from_numpy(cached[f"tap{k}"][index])
                                                               for k in range(3)]
    missing = [z for z in range(len(slices)) if z not in rows]
    for chunk in _chunks(missing, batch_size):
        neck, taps = encoder(slices[chunk], case)
        yield chunk, neck, taps


def decode(model: Model, neck: torch.Tensor, taps: list[torch.Tensor],
           settings: Settings) -> tuple[np.ndarray, np.ndarray]:
    """Fold-averaged foreground probabilities (B, size, size) at the plan's slice size and predicted IoU (B,)."""
    neck = neck.to(settings.device)
    taps = [t.to(settings.device) for t in taps]
    size = int(model.plan["slice_size"])
    probabilities = np.zeros((neck.shape[0], size, size), np.float32)
    iou = np.zeros(neck.shape[0], np.float32)
    for net in model.networks:
        p, q = slice_prediction.predict_slices(net, neck, taps, model.mode, grid=settings.grid,
                                        iou_threshold=settings.iou_threshold, batch_size=settings.batch_size,
                                        device=settings.device, precision=settings.precision,
                                        grid_rule=settings.grid_rule)
        probabilities += p
        iou += q
    return probabilities / len(model.networks), iou / len(model.networks)


def predict_volume(model: Model, volume: np.ndarray, encoder: SliceEncoder, settings: Settings,
                   cached: dict | None = None, rows: dict[int, int] | None = None, case: str = "volume",
                   slices: np.ndarray | None = None, progress: tqdm | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Foreground probabilities in the volume's own grid (float32, its shape) and the IoU per slice.

    `cached`/`rows` (from `CacheIndex.lookup`) supply features of some slices; the rest are encoded.
    """
    axis = int(model.plan["slice_axis"])
    slices = preprocess_volume(volume, model.plan) if slices is None else slices
    size = int(model.plan["slice_size"])
    probabilities = np.zeros((len(slices), size, size), np.float32)
    iou = np.zeros(len(slices), np.float32)
    for index, neck, taps in feature_batches(slices, encoder, cached or {}, rows or {}, settings.batch_size, case):
        probabilities[index], iou[index] = decode(model, neck, taps, settings)
        if progress is not None:
            progress.update(len(index))
    orientation = plan_orientation(model.plan)
    back = resize_probabilities_back(probabilities, in_plane_shape(volume.shape, axis, orientation))
    return np.ascontiguousarray(from_slices(back, axis, orientation)), iou


# ---------------------------------------------------------------- cases
@dataclass
class CaseResult:
    case: str
    status: str            # "predicted", "skipped" (output exists) or "failed"
    message: str = ""
    slices: int = 0
    cached_slices: int = 0


class Predictor:
    """A loaded model with its encoder, cache index and settings; predicts cases into a folder."""

    def __init__(self, model: Model, encoder: SliceEncoder, settings: Settings,
                 cache_index: CacheIndex | None = None):
        self.model, self.encoder, self.settings = model, encoder, settings
        self.cache_index = cache_index or CacheIndex(None, model.plan)

    def predict_case(self, case: CaseInput, out_dir: Path, progress: tqdm | None = None) -> CaseResult:
        """Predict one case and write its outputs; a bad input is a DesamError naming the file."""
        volume, image = read_case_volume(case)
        slices = preprocess_volume(volume, self.model.plan)
        cached, rows = self.cache_index.lookup(case.case, volume.shape, image.affine, slices)
        if progress is not None:
            progress.reset(total=len(slices))
            progress.set_postfix_str(case.case)
        probabilities, iou = predict_volume(self.model, volume, self.encoder, self.settings, cached, rows,
                                            case.case, slices, progress)
        mask = postprocess(probabilities > 0.5, self.settings.postprocess, int(self.model.plan["slice_axis"]))
        write_case_quality(out_dir, case.case, iou)
        if self.settings.save_probabilities:
            save_probabilities(probabilities, probabilities_path(out_dir, case.case))
        save_like(mask, image, output_path(out_dir, case.case), np.uint8)
        return CaseResult(case.case, "predicted", slices=len(slices), cached_slices=len(rows))

    def predict_cases(self, cases: list[CaseInput], out_dir: str | os.PathLike,
                      show_progress: bool = True) -> list[CaseResult]:
        """Predict every case (skipping finished ones when `skip_existing`); bad cases are reported, not fatal."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        results = []
        with tqdm(cases, desc="cases", unit="case", disable=not show_progress, dynamic_ncols=True) as bar, \
                tqdm(total=0, desc="slices", unit="slice", disable=not show_progress, leave=False,
                     dynamic_ncols=True) as slice_bar:
            for case in bar:
                if self.settings.skip_existing and output_path(out_dir, case.case).is_file():
                    results.append(CaseResult(case.case, "skipped", "output exists"))
                    continue
                try:
                    results.append(self.predict_case(case, out_dir, slice_bar))
                except DesamError as exc:
                    tqdm.write(f"desam: {case.case}: {exc} (skipped)", file=sys.stderr)
                    results.append(CaseResult(case.case, "failed", str(exc)))
        return results


def build_predictor(model: Model, settings: Settings, checkpoint: str | os.PathLike | None = None,
                    preprocessed_root: str | os.PathLike | None = None, use_cache: bool = True) -> Predictor:
    """Verify the SAM checkpoint against the plan and index the model's embedding cache."""
    encoder = SliceEncoder(model.plan, resolve_sam_checkpoint(model.plan, checkpoint), settings.device,
                           settings.precision)
    index = CacheIndex(cache_folder_of(model.folder, model.plan, preprocessed_root) if use_cache else None, model.plan)
    return Predictor(model, encoder, settings, index)
