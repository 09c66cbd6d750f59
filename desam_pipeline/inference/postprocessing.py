"""Post-processing of predicted binary masks, in the volume's own geometry.

Methods (`--postprocess`):
- `none`;
- `paper`: the reference's per-slice clean-up (below);
- `largest`: keep the largest 3D connected component (a prostate is one object);
- `fill`: fill the holes of every slice;
- `min_size`: drop 3D components smaller than MIN_OBJECT_ML;
- `largest+fill` and `min_size+fill`: the two steps, in that order.

`paper` is the reference rule: segment_anything's `remove_small_regions` per slice, first filling
holes smaller than 1000 px at 256x256, then removing islands smaller than that (8-connectivity;
when every island is small the largest is kept). It is applied in each slice's own grid, so the
threshold is scaled by the slice's pixel count.
"""
from __future__ import annotations

import numpy as np
from acvl_utils.morphology.morphology_helper import remove_all_but_largest_component
from scipy.ndimage import binary_fill_holes
from segment_anything.utils.amg import remove_small_regions
from skimage.morphology import remove_small_objects

from desam_pipeline.data.preprocessing import SLICE_AXIS, SLICE_SIZE

POSTPROCESSING = ("none", "paper", "largest", "fill", "min_size", "largest+fill", "min_size+fill")
PAPER_MIN_ISLAND = 1000  # pixels at SLICE_SIZE x SLICE_SIZE
MIN_OBJECT_ML = 1.0  # `min_size`: smaller 3D components are dropped


def fill_holes_and_drop_islands(mask2d: np.ndarray, min_area: float) -> np.ndarray:
    """One 2D slice as the reference cleans a mask: holes, then islands, under `min_area` pixels."""
    mask, _ = remove_small_regions(np.asarray(mask2d) > 0, min_area, mode="holes")
    mask, _ = remove_small_regions(mask, min_area, mode="islands")
    return mask


def paper_min_area(shape_hw: tuple[int, int]) -> float:
    """The reference 1000 px at 256x256, scaled to a slice of `shape_hw` pixels."""
    return PAPER_MIN_ISLAND * shape_hw[0] * shape_hw[1] / (SLICE_SIZE * SLICE_SIZE)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest connected component of a 3D mask (full 26-connectivity; components of equal largest
    size are all kept, as nnU-Net does); empty stays empty."""
    return remove_all_but_largest_component(np.asarray(mask) > 0, connectivity=None)


def fill_slice_holes(mask: np.ndarray, slice_axis: int = SLICE_AXIS) -> np.ndarray:
    """Fill the holes of every slice of a 3D mask (2D, so a cup open at one end is not closed across slices)."""
    slices = np.moveaxis(np.asarray(mask) > 0, slice_axis, 0)
    return np.moveaxis(np.stack([binary_fill_holes(s) for s in slices]), 0, slice_axis)


def drop_small_objects(mask: np.ndarray, spacing: tuple[float, ...], min_ml: float = MIN_OBJECT_ML) -> np.ndarray:
    """Drop 3D components (full 26-connectivity) smaller than `min_ml` millilitres."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return remove_small_objects(np.asarray(mask) > 0, max_size=int(np.ceil(min_ml / voxel_ml)) - 1, connectivity=3)


def postprocess(mask: np.ndarray, method: str, slice_axis: int = SLICE_AXIS,
                spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Apply `method` to a 3D binary mask in the volume's own geometry (`spacing` in mm); returns uint8 {0, 1}."""
    if method not in POSTPROCESSING:
        raise ValueError(f"unknown post-processing {method!r}; choose one of {', '.join(POSTPROCESSING)}")
    mask = np.asarray(mask) > 0
    for step in method.split("+"):
        if step == "largest":
            mask = largest_component(mask)
        elif step == "min_size":
            mask = drop_small_objects(mask, spacing)
        elif step == "fill":
            mask = fill_slice_holes(mask, slice_axis)
        elif step == "paper":
            slices = np.moveaxis(mask, slice_axis, 0)
            min_area = paper_min_area(slices.shape[1:])
            cleaned = np.stack([fill_holes_and_drop_islands(s, min_area) for s in slices])
            mask = np.moveaxis(cleaned, 0, slice_axis)
    return mask.astype(np.uint8)
