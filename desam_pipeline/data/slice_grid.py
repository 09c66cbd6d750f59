"""The plan's slice grid: a volume's slices resized to size x size, in mm and in a volume's world space.

The trainer's final validation scores cached slices on this grid, the paper protocol scores the
reference's 256 x 256 slices on it; both place slices, measure spacing and write masks the same way.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def slice_grid_spacing(spacing: Sequence[float], shape: Sequence[int], slice_axis: int,
                       size: int) -> tuple[float, ...]:
    """Spacing in mm of the (Z, size, size) slice stack (slices first, in-plane axes in array order): the
    slice spacing, then each in-plane spacing scaled by original size / `size`."""
    in_plane = [float(spacing[a]) * shape[a] / size for a in range(len(shape)) if a != slice_axis]
    return (float(spacing[slice_axis]), *in_plane)


def place_slices(slices: np.ndarray, rows: Sequence[int], count: int) -> np.ndarray:
    """(count, H, W) zeros holding `slices` (K, H, W) at slice indices `rows`: the slices a cache left out
    (no foreground there) are background."""
    stack = np.zeros((count, *slices.shape[1:]), dtype=slices.dtype)
    stack[np.asarray(rows, dtype=int)] = slices
    return stack


def slice_grid_affine(affine: np.ndarray, shape: Sequence[int], slice_axis: int, size: int) -> np.ndarray:
    """The affine of a volume resampled to `size` x `size` in-plane: each in-plane axis rescaled so voxel
    centres line up with the original's."""
    out = np.asarray(affine, dtype=np.float64).copy()
    for axis, length in enumerate(shape):
        if axis == slice_axis:
            continue
        factor = length / size
        out[:3, 3] += out[:3, axis] * (factor - 1) / 2
        out[:3, axis] *= factor
    return out
