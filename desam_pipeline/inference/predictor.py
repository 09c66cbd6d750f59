"""Segment NIfTI volumes with a trained DeSAM model folder, keeping each input's geometry exactly.

Per volume: the embed stage's preprocessing, the frozen SAM encoder over every slice in batches
(or the embedding cache of the same plan where it holds the slice), each fold's decoder through
`slice_prediction.predict_slices`, fold-averaged sigmoid probabilities resized back to the slice's own
grid, threshold 0.5, optional post-processing. Outputs per case: `<case>.nii.gz` (uint8 {0, 1},
the input's affine and header), `quality/<case>.csv` (PRIM's predicted IoU per slice), and with
`save_probabilities` `<case>.npz`; the mask is written last, so its presence marks a finished case.
The model folder is read by `inference.model`, the choices come from `inference.settings`.

A multi-structure model (one DeSAM per structure) encodes each slice once and runs every structure's
decoders on it; each structure is thresholded and post-processed on its own, then merged into one label
map (`class_merge`), and its predicted IoU per slice goes to `<structure folder>/quality/<case>.csv`
(`quality/<case>.csv` holds the highest over the structures). CT inputs are clipped to the plan's CT
window: the modality comes from `--modality`, else from the model's dataset when it has one modality.
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from desam_pipeline.data.orientation import from_slices, in_plane_shape, plan_orientation
from desam_pipeline.data.plan_io import verify_sam_checkpoint
from desam_pipeline.data.preprocessing import from_frame, preprocess_volume, volume_frame
from desam_pipeline.data.raw_dataset import domains, modality_of_site
from desam_pipeline.inference import slice_prediction
from desam_pipeline.inference.class_merge import merge_structures
from desam_pipeline.inference.features import CacheIndex, SliceEncoder, cache_folder_of
from desam_pipeline.inference.inputs import CaseInput, read_case_volume
from desam_pipeline.inference.model import Model, gate_thresholds
from desam_pipeline.inference.outputs import output_path, probabilities_path, save_probabilities, write_case_quality
from desam_pipeline.inference.postprocessing import postprocess
from desam_pipeline.inference.settings import MASK_THRESHOLD, PredictionSettings
from desam_pipeline.io.nifti_io import save_like, voxel_spacing
from desam_pipeline.io.results_layout import class_folder
from desam_pipeline.utilities.errors import DesamError
from desam_pipeline.utilities.runtime import resolve_precision, select_device


@dataclass(frozen=True)
class PredictionRun:
    """Prediction settings resolved for one plan on one device: the precision and batch size in use.

    The precision (autocast, the plan's for the device) serves the encoder and the decoders alike: with
    bf16 on CPU the decoders' convolutions run about twice as fast as in fp32.
    """
    settings: PredictionSettings
    device: torch.device
    precision: str
    batch_size: int


def resolve_run(plan: dict, settings: PredictionSettings, device: torch.device | None = None) -> PredictionRun:
    """`settings` checked and resolved for `plan` on `device` (default: the settings' device choice)."""
    settings.validate()
    device = select_device(settings.device) if device is None else torch.device(device)
    batch_size = settings.batch_size if settings.batch_size is not None else plan["batch_size"][device.type]
    return PredictionRun(settings, device, resolve_precision(plan["precision"][device.type], device), int(batch_size))


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
           run: PredictionRun) -> tuple[np.ndarray, np.ndarray]:
    """Fold-averaged foreground probabilities (B, size, size) at the plan's slice size and predicted IoU (B,)."""
    neck = neck.to(run.device)
    taps = [t.to(run.device) for t in taps]
    size = int(model.plan["slice_size"])
    probabilities = np.zeros((neck.shape[0], size, size), np.float32)
    iou = np.zeros(neck.shape[0], np.float32)
    for index, net in enumerate(model.networks):
        settings = model.fold_settings(index, run.settings)
        p, q = slice_prediction.predict_slices(net, neck, taps, model.mode, settings, batch_size=run.batch_size,
                                               device=run.device, precision=run.precision, size=size)
        probabilities += p
        iou += q
    return probabilities / len(model.networks), iou / len(model.networks)


def predict_structures(models: list[Model], volume: np.ndarray, encoder: SliceEncoder, run: PredictionRun,
                       cached: dict | None = None, rows: dict[int, int] | None = None, case: str = "volume",
                       slices: np.ndarray | None = None, progress: tqdm | None = None,
                       spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per model (structure): foreground probabilities in the volume's own grid (float32, its shape) and the IoU
    per slice. Each slice is encoded once for all models.

    `spacing`: the volume's voxel spacing (mm), for the plan's in-plane rule.
    `cached`/`rows` (from `CacheIndex.lookup`) supply features of some slices; the rest are encoded.
    """
    plan = models[0].plan
    axis = int(plan["slice_axis"])
    slices = preprocess_volume(volume, plan, spacing) if slices is None else slices
    size = int(plan["slice_size"])
    probabilities = np.zeros((len(models), len(slices), size, size), np.float32)
    iou = np.zeros((len(models), len(slices)), np.float32)
    for index, neck, taps in feature_batches(slices, encoder, cached or {}, rows or {}, run.batch_size, case):
        for m, model in enumerate(models):
            probabilities[m, index], iou[m, index] = decode(model, neck, taps, run)
        if progress is not None:
            progress.update(len(index))
    orientation = plan_orientation(plan)
    frame, shape = volume_frame(volume.shape, spacing, plan), in_plane_shape(volume.shape, axis, orientation)
    return [(np.ascontiguousarray(from_slices(from_frame(p, frame, shape), axis, orientation)), q)
            for p, q in zip(probabilities, iou)]


def predict_volume(model: Model, volume: np.ndarray, encoder: SliceEncoder, run: PredictionRun,
                   cached: dict | None = None, rows: dict[int, int] | None = None, case: str = "volume",
                   slices: np.ndarray | None = None, progress: tqdm | None = None,
                   spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Foreground probabilities in the volume's own grid (float32, its shape) and the IoU per slice.

    `spacing`: the volume's voxel spacing (mm), for the plan's in-plane rule."""
    return predict_structures([model], volume, encoder, run, cached, rows, case, slices, progress, spacing)[0]


def resolve_modality(model: Model, requested: str | None) -> str | None:
    """The inputs' modality: `requested`, else the one modality of the model's dataset; a plan with intensity
    windows over a dataset of several modalities needs it named (None: no window applies)."""
    if requested or not model.plan["intensity"].get("windows"):
        return requested
    found = sorted({modality_of_site(model.dataset_json, site) for site in set(domains(model.dataset_json).values())}
                   - {None}) or [modality_of_site(model.dataset_json, None)]
    if len(found) > 1:
        raise DesamError(f"{model.folder}: the model's dataset holds several modalities ({', '.join(found)}) and its "
                         f"plan windows {', '.join(model.plan['intensity']['windows'])}; name the inputs' one with "
                         f"--modality")
    return found[0]


@dataclass
class CaseResult:
    case: str
    status: str            # "predicted", "skipped" (output exists) or "failed"
    message: str = ""
    slices: int = 0
    cached_slices: int = 0


class Predictor:
    """A loaded model with its encoder, cache index and resolved settings; predicts cases into a folder."""

    def __init__(self, model: Model, encoder: SliceEncoder, run: PredictionRun,
                 cache_index: CacheIndex | None = None, modality: str | None = None):
        """`modality`: the inputs' (see `resolve_modality`, which runs at the first case)."""
        self.model, self.encoder, self.run = model, encoder, run
        self.cache_index = cache_index or CacheIndex(None, model.plan)
        self.requested_modality = modality or run.settings.modality

    @functools.cached_property
    def modality(self) -> str | None:
        return resolve_modality(self.model, self.requested_modality)

    def predict_case(self, case: CaseInput, out_dir: Path, progress: tqdm | None = None) -> CaseResult:
        """Predict one case and write its outputs; a bad input is a DesamError naming the file."""
        volume, image = read_case_volume(case)
        spacing = voxel_spacing(image)
        slices = preprocess_volume(volume, self.model.plan, spacing, self.modality)
        cached, rows = self.cache_index.lookup(case.case, volume.shape, image.affine, slices)
        if progress is not None:
            progress.reset(total=len(slices))
            progress.set_postfix_str(case.case)
        structures = self.model.structures
        predicted = predict_structures(structures, volume, self.encoder, self.run, cached, rows, case.case, slices,
                                       progress, spacing)
        settings, axis = self.run.settings, int(self.model.plan["slice_axis"])
        masks = [postprocess(p > MASK_THRESHOLD, settings.postprocess, axis, spacing) for p, _ in predicted]
        if self.model.classes:
            for structure, (_, iou) in zip(structures, predicted):
                write_case_quality(class_folder(out_dir, structure.label_value), case.case, iou)
            mask = merge_structures([p for p, _ in predicted], masks, [s.label_value for s in structures])
        else:
            mask = masks[0]
        write_case_quality(out_dir, case.case, np.max([iou for _, iou in predicted], axis=0))
        if settings.save_probabilities:
            probabilities = np.stack([p for p, _ in predicted]) if self.model.classes else predicted[0][0]
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
                if self.run.settings.skip_existing and output_path(out_dir, case.case).is_file():
                    results.append(CaseResult(case.case, "skipped", "output exists"))
                    continue
                try:
                    results.append(self.predict_case(case, out_dir, slice_bar))
                except DesamError as exc:
                    tqdm.write(f"desam: {case.case}: {exc} (skipped)", file=sys.stderr)
                    results.append(CaseResult(case.case, "failed", str(exc)))
        return results


def build_predictor(model: Model, run: PredictionRun, preprocessed_root: str | os.PathLike | None = None,
                    use_cache: bool = True, modality: str | None = None) -> Predictor:
    """Verify the SAM checkpoint (the settings', else the plan's) and index the model's embedding cache."""
    gate_thresholds(model, run.settings)  # a missing calibration fails here, before any encoding
    checkpoint = verify_sam_checkpoint(model.plan, run.settings.checkpoint, missing_hint="pass --checkpoint")
    encoder = SliceEncoder(model.plan, checkpoint, run.device, run.precision)
    index = CacheIndex(cache_folder_of(model.folder, model.plan, preprocessed_root) if use_cache else None, model.plan)
    return Predictor(model, encoder, run, index, modality)
