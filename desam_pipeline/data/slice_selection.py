"""Which slices of a volume are cached and trained on: every slice, the foreground slices, or the
foreground range widened by a margin."""
from __future__ import annotations

import numpy as np

from desam_pipeline.data.preprocessing import SLICE_AXIS
from desam_pipeline.utilities.errors import DesamError

SLICE_MODES = ("foreground_margin", "foreground", "all")


def foreground_slices(label: np.ndarray, axis: int = SLICE_AXIS) -> list[int]:
    """Indices along `axis` of the slices holding any foreground voxel."""
    other = tuple(a for a in range(label.ndim) if a != axis)
    return np.flatnonzero(np.any(label > 0, axis=other)).tolist()


def select_slices(foreground_z: list[int], depth: int, mode: str, margin: int = 2) -> list[int]:
    """Slices to cache: every foreground slice (the last one included), the foreground range
    widened by `margin` either side and clipped to the volume, or all of them."""
    if mode == "all":
        return list(range(depth))
    if mode == "foreground":
        return sorted(foreground_z)
    if mode == "foreground_margin":
        if not foreground_z:
            return []
        return list(range(max(min(foreground_z) - margin, 0), min(max(foreground_z) + margin, depth - 1) + 1))
    raise DesamError(f"unknown slice selection {mode!r}; choose one of {', '.join(SLICE_MODES)}")
