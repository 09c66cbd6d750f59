"""Overlap and surface metrics of binary 3D masks, in mm, matching MedPy's definitions.

Definitions (reference R, prediction P, voxel spacing in mm):
- Dice = 2|R & P| / (|R| + |P|)  (MedPy `dc`).
- Surfaces: the voxels a single binary erosion removes, with the 6-connected (face) structuring
  element and everything outside the array counted as background, so a mask touching the volume
  border has a surface there (MedPy `__surface_distances`, connectivity 1).
- Directed distances: for every surface voxel of one mask, the Euclidean distance in mm
  (scipy `distance_transform_edt` with `sampling=spacing`) to the nearest surface voxel of the other.
- HD95: the 95th percentile (numpy linear interpolation) of the union of both directed distance
  sets (MedPy `hd95`; not MONAI's max of the two directed percentiles).
- ASSD: the mean of the union of both directed distance sets (MedPy 0.5.2 `assd`).
- NSD (normalised surface Dice) at tolerance t mm: the fraction of surface voxels of both masks
  lying within t mm of the other mask's surface, counted over voxels (not surface area).

Empty masks (never a crash, never a made-up number):
- both empty: dice 1.0, hd95 0.0, assd 0.0, nsd 1.0 (the prediction is exactly right);
- only one empty: dice 0.0, nsd 0.0, hd95 and assd NaN (a distance to nothing is undefined).
  Summaries leave NaN out of means and report how many cases each mean excludes.

Speed: distances are computed inside the bounding box of both masks plus a 1-voxel margin. The
crop is exact: every surface voxel lies in the box and the EDT only measures distances to surface
voxels, and every voxel outside the box is background, so the erosion sees the same neighbours
(the margin keeps each surface voxel's full 6-neighbourhood inside the array).
"""
from __future__ import annotations

import os
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from desam_pipeline.utilities.errors import DesamError

METRICS = ("dice", "hd95", "assd", "nsd")
DEFAULT_NSD_TOLERANCE_MM = 1.0
CROP_MARGIN = 1
GEOMETRY_TOLERANCE = 1e-4


def _as_bool(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    return mask if mask.dtype == bool else mask != 0


def _check_inputs(reference: np.ndarray, prediction: np.ndarray, spacing) -> np.ndarray:
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} != prediction shape {prediction.shape}")
    spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if spacing.size != reference.ndim or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing {spacing.tolist()} must be {reference.ndim} positive numbers (mm)")
    return spacing


def bounding_box(mask: np.ndarray, margin: int = CROP_MARGIN) -> tuple[slice, ...]:
    """Slices of the smallest box holding every True voxel, grown by `margin` (clipped to the array)."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=other))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels removed by one 6-connected (face) erosion; outside the array counts as background."""
    footprint = generate_binary_structure(mask.ndim, 1)
    return mask & ~binary_erosion(mask, structure=footprint, iterations=1)


def surface_distances(reference: np.ndarray, prediction: np.ndarray, spacing,
                      crop: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm of two non-empty masks: (prediction -> reference, reference -> prediction).

    `crop=False` uses the arrays as given (already cropped, or the whole volume to check the crop).
    """
    reference, prediction = _as_bool(reference), _as_bool(prediction)
    spacing = _check_inputs(reference, prediction, spacing)
    if not reference.any() or not prediction.any():
        raise ValueError("surface distances need two non-empty masks")
    if crop:
        box = bounding_box(reference | prediction)
        reference, prediction = reference[box], prediction[box]
    reference_surface, prediction_surface = surface(reference), surface(prediction)
    to_reference = distance_transform_edt(~reference_surface, sampling=spacing)[prediction_surface]
    to_prediction = distance_transform_edt(~prediction_surface, sampling=spacing)[reference_surface]
    return to_reference, to_prediction


def dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Dice overlap; 1.0 when both masks are empty."""
    reference, prediction = _as_bool(reference), _as_bool(prediction)
    total = int(np.count_nonzero(reference)) + int(np.count_nonzero(prediction))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(reference & prediction)) / total


def compute_metrics(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float],
                    nsd_tolerance: float = DEFAULT_NSD_TOLERANCE_MM) -> dict[str, float]:
    """dice, hd95 (mm), assd (mm) and nsd (at `nsd_tolerance` mm) of two binary masks, with the
    empty-mask conventions of the module docstring."""
    reference, prediction = _as_bool(reference), _as_bool(prediction)
    spacing = _check_inputs(reference, prediction, spacing)
    has_reference, has_prediction = bool(reference.any()), bool(prediction.any())
    if not has_reference and not has_prediction:
        return {"dice": 1.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0}
    if not has_reference or not has_prediction:
        return {"dice": 0.0, "hd95": float("nan"), "assd": float("nan"), "nsd": 0.0}
    box = bounding_box(reference | prediction)
    reference, prediction = reference[box], prediction[box]
    to_reference, to_prediction = surface_distances(reference, prediction, spacing, crop=False)
    within = int(np.count_nonzero(to_reference <= nsd_tolerance)) + int(np.count_nonzero(to_prediction <= nsd_tolerance))
    distances = np.concatenate([to_reference, to_prediction])
    return {
        "dice": dice(reference, prediction),
        "hd95": float(np.percentile(distances, 95)),
        "assd": float(distances.mean()),
        "nsd": within / distances.size,
    }


def hd95(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float]) -> float:
    """MedPy's HD95 in mm; 0.0 when both masks are empty, NaN when only one is."""
    return compute_metrics(reference, prediction, spacing)["hd95"]


def check_same_geometry(reference: nib.Nifti1Image, prediction: nib.Nifti1Image,
                        reference_path: str | os.PathLike, prediction_path: str | os.PathLike,
                        tolerance: float = GEOMETRY_TOLERANCE) -> None:
    """Raise a DesamError naming both files unless the images share shape and affine (within `tolerance`)."""
    ref_shape, pred_shape = tuple(reference.shape[:3]), tuple(prediction.shape[:3])
    if ref_shape != pred_shape:
        raise DesamError(f"{prediction_path}: shape {pred_shape} differs from reference {reference_path} "
                         f"shape {ref_shape}")
    difference = float(np.max(np.abs(np.asarray(reference.affine) - np.asarray(prediction.affine))))
    if not difference <= tolerance:
        raise DesamError(f"{prediction_path}: affine differs from reference {reference_path} by up to "
                         f"{difference:.3g} (tolerance {tolerance:g}); resample the prediction onto the reference grid")
