"""The reference evaluation protocol of the DeSAM paper (`paper`), next to the honest `full` one.

The reference code scored its own 256x256 slices: the slices from the case's first foreground
slice up to, but not including, its last one (its loop stops one short), of those only the ones
whose resized ground truth holds foreground, with a 50-pixel border of every predicted slice set
to background, Dice per patient in 3D over those slices, and one mean over all patients of the
unseen sites pooled together (`desam_report` prints it beside the mean of per-site means).

The ground truth is brought to that grid as the reference does: scikit-image's `resize` of the
uint8 label slice with order 0, mode constant and anti-aliasing on (a Gaussian before the nearest
neighbour when downsampling, which erodes the label slightly and can drop thin parts), foreground
where the result is non-zero. The prediction is the saved NIfTI mask in original geometry, brought
to 256x256 with the pipeline's nearest-neighbour slice resize (`preprocessing.resize_label_slices`),
so `full` and `paper` score the very same prediction file; resizing it back can move boundary
pixels by at most one 256-grid pixel compared with thresholding the network's 256x256 output.

The kept slices are stacked in order and scored as one 3D volume with spacing (slice spacing,
in-plane spacing x original size / 256), so HD95, ASSD and NSD are in mm (kept slices are treated
as adjacent; for an organ they are).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from skimage.transform import resize

from desam_pipeline.data.preprocessing import SLICE_AXIS, SLICE_SIZE, resize_label_slices, slices_first
from desam_pipeline.data.slice_grid import slice_grid_spacing
from desam_pipeline.utilities.metrics import DEFAULT_NSD_TOLERANCE_MM, METRICS, compute_metrics

BORDER = 50  # pixels of each 256x256 predicted slice set to background by the reference code


def to_slice_grid(mask: np.ndarray, slice_axis: int = SLICE_AXIS, size: int = SLICE_SIZE) -> np.ndarray:
    """(X, Y, Z) binary mask -> (Z, size, size) uint8 {0, 1} slices, nearest neighbour."""
    return resize_label_slices(slices_first(np.asarray(mask) > 0, slice_axis), size)


def reference_label_grid(mask: np.ndarray, slice_axis: int = SLICE_AXIS, size: int = SLICE_SIZE) -> np.ndarray:
    """(X, Y, Z) ground truth -> (Z, size, size) bool slices, resized slice by slice as the reference
    resizes its labels (uint8, order 0, mode constant, anti-aliasing on)."""
    slices = slices_first(np.asarray(mask) > 0, slice_axis).astype(np.uint8)
    return np.stack([resize(s, (size, size), order=0, preserve_range=True, mode="constant", anti_aliasing=True) > 0
                     for s in slices]) if len(slices) else np.zeros((0, size, size), bool)


def zero_border(slices: np.ndarray, border: int = BORDER) -> np.ndarray:
    """A copy of (S, H, W) slices with a `border`-pixel frame of every slice set to 0."""
    out = np.array(slices, copy=True)
    if border > 0:
        out[:, :border, :] = 0
        out[:, -border:, :] = 0
        out[:, :, :border] = 0
        out[:, :, -border:] = 0
    return out


def reference_slice_indices(reference: np.ndarray, reference_slices: np.ndarray,
                            slice_axis: int = SLICE_AXIS) -> np.ndarray:
    """The slices the reference scores: from the first foreground slice of the original `reference`
    up to but not including its last one, where the resized `reference_slices` hold foreground."""
    original = slices_first(np.asarray(reference) > 0, slice_axis).reshape(reference.shape[slice_axis], -1).any(axis=1)
    present = np.flatnonzero(original)
    if present.size == 0:
        return present
    resized = reference_slices.reshape(len(reference_slices), -1).any(axis=1)
    candidates = np.arange(present[0], present[-1])
    return candidates[resized[candidates]]


def paper_volumes(reference: np.ndarray, prediction: np.ndarray, slice_axis: int = SLICE_AXIS,
                  border: int = BORDER) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scored arrays of the protocol: (reference (K,256,256) bool, border-zeroed prediction
    (K,256,256) bool, the K kept slice indices, see `reference_slice_indices`)."""
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} != prediction shape {prediction.shape}")
    reference_slices = reference_label_grid(reference, slice_axis)
    prediction_slices = zero_border(to_slice_grid(prediction, slice_axis), border)
    kept = reference_slice_indices(reference, reference_slices, slice_axis)
    return reference_slices[kept] > 0, prediction_slices[kept] > 0, kept


def paper_metrics(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float],
                  slice_axis: int = SLICE_AXIS, nsd_tolerance: float = DEFAULT_NSD_TOLERANCE_MM,
                  border: int = BORDER) -> dict:
    """dice, hd95, assd, nsd under the reference protocol, plus `slices_scored`.

    A case whose ground truth is empty has no slice to score: every metric is NaN (the reference
    protocol has nothing to say about it) and `slices_scored` is 0.
    """
    ref, pred, kept = paper_volumes(reference, prediction, slice_axis, border)
    if kept.size == 0:
        return {metric: float("nan") for metric in METRICS} | {"slices_scored": 0}
    scaled = slice_grid_spacing(spacing, reference.shape, slice_axis, SLICE_SIZE)
    return compute_metrics(ref, pred, scaled, nsd_tolerance=nsd_tolerance) | {"slices_scored": int(kept.size)}
