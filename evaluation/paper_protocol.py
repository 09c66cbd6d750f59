"""The reference evaluation protocol of the DeSAM paper (`paper`), next to the honest `full` one.

The reference code scored its own 256x256 slices: only the slices whose ground truth holds
foreground, with a 50-pixel border of every predicted slice set to background, Dice per patient
in 3D over those slices. It is optimistic (empty slices cannot produce false positives, nor can
the border), and is offered so numbers can be set beside the paper's.

Here both the ground truth and the prediction are brought to that grid with the pipeline's own
nearest-neighbour slice resize (`preprocessing.resize_label_slices`, as the embedding cache does
for labels). The prediction is the saved NIfTI mask in original geometry, so `full` and `paper`
score the very same prediction file; resizing it back to 256x256 can move boundary pixels by at
most one 256-grid pixel compared with thresholding the network's 256x256 output directly.

Slices are kept where the resized ground truth has foreground; they are stacked in order and
scored as one 3D volume with spacing (slice spacing, in-plane spacing x original size / 256), so
HD95, ASSD and NSD are in mm (kept slices are treated as adjacent; for an organ they are).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from desam_pipeline.preprocessing import SLICE_AXIS, SLICE_SIZE, resize_label_slices, slices_first
from evaluation.metrics import METRICS, compute_metrics

BORDER = 50  # pixels of each 256x256 predicted slice set to background by the reference code


def to_slice_grid(mask: np.ndarray, slice_axis: int = SLICE_AXIS, size: int = SLICE_SIZE) -> np.ndarray:
    """(X, Y, Z) binary mask -> (Z, size, size) uint8 {0, 1} slices, nearest neighbour."""
    return resize_label_slices(slices_first(np.asarray(mask) > 0, slice_axis), size)


def zero_border(slices: np.ndarray, border: int = BORDER) -> np.ndarray:
    """A copy of (S, H, W) slices with a `border`-pixel frame of every slice set to 0."""
    out = np.array(slices, copy=True)
    if border > 0:
        out[:, :border, :] = 0
        out[:, -border:, :] = 0
        out[:, :, :border] = 0
        out[:, :, -border:] = 0
    return out


def foreground_slice_indices(reference_slices: np.ndarray) -> np.ndarray:
    """Indices of the (S, H, W) reference slices holding foreground."""
    return np.flatnonzero(reference_slices.reshape(len(reference_slices), -1).any(axis=1))


def slice_grid_spacing(spacing: Sequence[float], shape: Sequence[int], slice_axis: int = SLICE_AXIS,
                       size: int = SLICE_SIZE) -> tuple[float, ...]:
    """Spacing in mm of the (Z, size, size) slice stack: the slice spacing, then each in-plane
    spacing scaled by original size / `size`."""
    in_plane = [float(spacing[a]) * shape[a] / size for a in range(len(shape)) if a != slice_axis]
    return (float(spacing[slice_axis]), *in_plane)


def paper_volumes(reference: np.ndarray, prediction: np.ndarray, slice_axis: int = SLICE_AXIS,
                  border: int = BORDER) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scored arrays of the protocol: (reference (K,256,256) bool, border-zeroed prediction
    (K,256,256) bool, the K kept slice indices), K = slices whose resized reference has foreground."""
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} != prediction shape {prediction.shape}")
    reference_slices = to_slice_grid(reference, slice_axis)
    prediction_slices = zero_border(to_slice_grid(prediction, slice_axis), border)
    kept = foreground_slice_indices(reference_slices)
    return reference_slices[kept] > 0, prediction_slices[kept] > 0, kept


def paper_metrics(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float],
                  slice_axis: int = SLICE_AXIS, nsd_tolerance: float = 1.0, border: int = BORDER) -> dict:
    """dice, hd95, assd, nsd under the reference protocol, plus `slices_scored`.

    A case whose ground truth is empty has no slice to score: every metric is NaN (the reference
    protocol has nothing to say about it) and `slices_scored` is 0.
    """
    ref, pred, kept = paper_volumes(reference, prediction, slice_axis, border)
    if kept.size == 0:
        return {metric: float("nan") for metric in METRICS} | {"slices_scored": 0}
    scaled = slice_grid_spacing(spacing, reference.shape, slice_axis)
    return compute_metrics(ref, pred, scaled, nsd_tolerance=nsd_tolerance) | {"slices_scored": int(kept.size)}
