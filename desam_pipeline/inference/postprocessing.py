"""Post-processing of predicted binary masks: none, the paper's per-slice clean-up, or the largest 3D component.

`paper` is the reference rule: segment_anything's `remove_small_regions` per slice, first filling
holes smaller than 1000 px at 256x256, then removing islands smaller than that (8-connectivity;
when every island is small the largest is kept). It is applied in each slice's own grid, so the
threshold is scaled by the slice's pixel count.
"""
from __future__ import annotations

import numpy as np
from acvl_utils.morphology.morphology_helper import remove_all_but_largest_component
from segment_anything.utils.amg import remove_small_regions

from desam_pipeline.data.preprocessing import SLICE_AXIS, SLICE_SIZE

POSTPROCESSING = ("none", "paper", "largest")
PAPER_MIN_ISLAND = 1000  # pixels at SLICE_SIZE x SLICE_SIZE


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


def postprocess(mask: np.ndarray, method: str, slice_axis: int = SLICE_AXIS) -> np.ndarray:
    """Apply `method` to a 3D binary mask in the volume's own geometry; returns uint8 {0, 1}."""
    if method not in POSTPROCESSING:
        raise ValueError(f"unknown post-processing {method!r}; choose one of {', '.join(POSTPROCESSING)}")
    mask = np.asarray(mask) > 0
    if method == "largest":
        mask = largest_component(mask)
    elif method == "paper":
        slices = np.moveaxis(mask, slice_axis, 0)
        min_area = paper_min_area(slices.shape[1:])
        cleaned = np.stack([fill_holes_and_drop_islands(s, min_area) for s in slices])
        mask = np.moveaxis(cleaned, 0, slice_axis)
    return mask.astype(np.uint8)
