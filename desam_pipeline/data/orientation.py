"""Which way up a 2D slice is shown to SAM: the plan field `slice_orientation`.

nibabel gives a volume in file index order (i, j, k); SimpleITK's `GetArrayFromImage` gives the
same voxels as (k, j, i). The reference code reads with SimpleITK, so each slice it gives SAM has
its rows along the later in-plane file axis and its columns along the earlier one (rows = y,
columns = x for an axial slice). SAM is not rotation-invariant, so desam does the same:

- `simpleitk` (default): (S, later in-plane axis, earlier in-plane axis), as the reference;
- `nibabel`: (S, earlier, later), the array order plans written before this field used.

`to_slices` and `from_slices` are exact inverses, so outputs keep the input geometry.
"""
from __future__ import annotations

import numpy as np

ORIENTATIONS = ("simpleitk", "nibabel")
DEFAULT_ORIENTATION = "simpleitk"
LEGACY_ORIENTATION = "nibabel"  # plans without the field were embedded this way


def plan_orientation(plan: dict | None) -> str:
    """The plan's slice orientation; a plan written before the field existed sliced in array order."""
    orientation = (plan or {}).get("slice_orientation", LEGACY_ORIENTATION if plan else DEFAULT_ORIENTATION)
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown slice_orientation {orientation!r}; choose one of {', '.join(ORIENTATIONS)}")
    return orientation


def to_slices(volume: np.ndarray, axis: int, orientation: str) -> np.ndarray:
    """Volume -> (S, rows, columns) slices along `axis`, rows and columns as `orientation` says (a view)."""
    slices = np.moveaxis(volume, axis, 0)
    return slices.swapaxes(1, 2) if orientation == "simpleitk" else slices


def from_slices(slices: np.ndarray, axis: int, orientation: str) -> np.ndarray:
    """(S, rows, columns) slices -> volume with the slices along `axis`: the inverse of `to_slices`."""
    slices = slices.swapaxes(1, 2) if orientation == "simpleitk" else slices
    return np.moveaxis(slices, 0, axis)


def in_plane_values(values: tuple, axis: int, orientation: str) -> tuple:
    """The two in-plane entries of a per-axis triple (shape, spacing) as (rows, columns) of `to_slices`' slices."""
    in_plane = tuple(v for a, v in enumerate(values) if a != axis)
    return (in_plane[1], in_plane[0]) if orientation == "simpleitk" else in_plane


def in_plane_shape(shape: tuple[int, ...], axis: int, orientation: str) -> tuple[int, int]:
    """(rows, columns) of the slices `to_slices` makes from a volume of `shape`."""
    return tuple(int(s) for s in in_plane_values(tuple(shape), axis, orientation))
