"""The method's slice preprocessing, identical for embedding, training targets and prediction.

Volume -> clip to the 0.5/99.5 percentiles -> 0..255 uint8 (exact zeros stay 0) -> axial
slices resized to 256x256 (bicubic image, nearest label), or, under the plan's `spacing` in-plane rule,
resampled to the plan's millimetres per pixel and centred on the 256x256 canvas (`slice_frame`). What the image encoder is then fed
depends on its family (see `network.encoders`).

CT (a modality with a window in the plan's `intensity.windows`, e.g. {"CT": [low, high]} from the
foreground intensity percentiles of the fingerprint, as nnU-Net does) is clipped to that fixed window
instead, the same for every case, with no special zero (0 HU is water). Labels are {0, 1} (label > 0),
or keep their class values when the plan lists `label_classes` (a dataset with several structures).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from skimage.transform import resize

from desam_pipeline.data.orientation import in_plane_shape, in_plane_values, plan_orientation, to_slices

SLICE_SIZE = 256
SLICE_AXIS = 2


def intensity_to_uint8(volume: np.ndarray, low_percentile: float = 0.5,
                       high_percentile: float = 99.5) -> np.ndarray:
    """Clip a volume to its percentiles and scale to 0..255 uint8, keeping voxels that were 0 at 0."""
    volume = np.asarray(volume, dtype=np.float32)
    low, high = np.percentile(volume, [low_percentile, high_percentile])
    if high <= low:
        scaled = np.zeros_like(volume)
    else:
        scaled = (np.clip(volume, low, high) - low) / (high - low) * 255.0
    scaled[volume == 0] = 0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def window_to_uint8(volume: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip a volume to a fixed intensity window (e.g. CT in HU) and scale it to 0..255 uint8."""
    volume = np.asarray(volume, dtype=np.float32)
    scaled = (np.clip(volume, low, high) - low) / (high - low) * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def volume_to_uint8(volume: np.ndarray, intensity: dict, modality: str | None = None) -> np.ndarray:
    """The plan's intensity scaling of one volume: the modality's window when the plan has one (CT), else the
    volume's own percentiles (`intensity_to_uint8`, as plans without windows always did)."""
    window = intensity.get("windows", {}).get(modality) if modality else None
    if window is not None:
        return window_to_uint8(volume, *window)
    return intensity_to_uint8(volume, intensity["low_percentile"], intensity["high_percentile"])


def slices_first(volume: np.ndarray, axis: int = SLICE_AXIS) -> np.ndarray:
    """(X, Y, Z) -> (Z, X, Y): one 2D slice per leading index."""
    return np.moveaxis(volume, axis, 0)


def _shape(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def resize_image_slices(slices: np.ndarray, size: int | tuple[int, int] = SLICE_SIZE) -> np.ndarray:
    """(S, H, W) uint8 -> (S, size, size) (or (S, *size)) uint8, bicubic."""
    out = resize(slices.astype(np.float32), (slices.shape[0], *_shape(size)), order=3,
                 mode="edge", anti_aliasing=False, preserve_range=True)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def resize_label_slices(slices: np.ndarray, size: int | tuple[int, int] = SLICE_SIZE) -> np.ndarray:
    """(S, H, W) labels -> (S, size, size) (or (S, *size)) uint8 in {0, 1}, nearest neighbour."""
    out = resize((slices > 0).astype(np.uint8), (slices.shape[0], *_shape(size)), order=0,
                 mode="edge", anti_aliasing=False, preserve_range=True)
    return (out > 0).astype(np.uint8)


def resize_class_slices(slices: np.ndarray, size: int | tuple[int, int] = SLICE_SIZE) -> np.ndarray:
    """(S, H, W) class labels -> (S, size, size) (or (S, *size)) uint8 keeping each voxel's class, nearest
    neighbour."""
    out = resize(np.asarray(slices).astype(np.uint8), (slices.shape[0], *_shape(size)), order=0,
                 mode="edge", anti_aliasing=False, preserve_range=True)
    return np.round(out).astype(np.uint8)


def in_plane(plan: dict | None) -> dict:
    """The plan's in-plane rule: {"rule": "resize"} (every slice resized to the slice size, as the reference;
    plans written before the field existed) or {"rule": "spacing", "spacing_mm": t} (every slice resampled to
    t mm per pixel, then centred on the slice-size canvas: cropped where wider, padded with 0 where narrower)."""
    return dict((plan or {}).get("in_plane", {"rule": "resize"}))


@dataclass(frozen=True)
class SliceFrame:
    """Where an (H, W) slice lands on the size x size input: resized to `resized`, then placed with its
    top-left pixel at `offset` (a negative offset crops)."""
    resized: tuple[int, int]
    offset: tuple[int, int]
    size: int

    def windows(self) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """(canvas window, resized-slice window) of the overlap of the two."""
        canvas, source = [], []
        for length, offset in zip(self.resized, self.offset):
            start, stop = max(offset, 0), min(offset + length, self.size)
            canvas.append(slice(start, stop))
            source.append(slice(start - offset, stop - offset))
        return tuple(canvas), tuple(source)


def slice_frame(shape_hw: tuple[int, int], spacing_hw: tuple[float, float], plan: dict | None) -> SliceFrame:
    """The frame of a slice of `shape_hw` pixels of `spacing_hw` mm (rows, columns) under the plan's rule."""
    size = int(plan["slice_size"]) if plan else SLICE_SIZE
    rule = in_plane(plan)
    if rule["rule"] != "spacing":
        return SliceFrame((size, size), (0, 0), size)
    target = float(rule["spacing_mm"])
    resized = tuple(max(int(round(n * s / target)), 1) for n, s in zip(shape_hw, spacing_hw))
    return SliceFrame(resized, tuple((size - r) // 2 for r in resized), size)


def frame_spacing(frame: SliceFrame, shape_hw: tuple[int, int], spacing_hw: tuple[float, float]
                  ) -> tuple[float, float]:
    """mm per pixel (rows, columns) of the canvas of a slice of `shape_hw` pixels of `spacing_hw` mm."""
    return tuple(float(s) * n / r for s, n, r in zip(spacing_hw, shape_hw, frame.resized))


def _volume_order(pair: tuple, orientation: str) -> tuple:
    """A (rows, columns) pair of a slice in the volume's in-plane axis order."""
    return (pair[1], pair[0]) if orientation == "simpleitk" else tuple(pair)


def grid_spacing(shape: tuple[int, ...], spacing: tuple[float, ...], plan: dict) -> tuple[float, ...]:
    """Voxel spacing (mm, volume axis order) of the plan's slice grid of a volume: the slice spacing along
    the slice axis, the canvas's mm per pixel in plane."""
    axis, orientation = int(plan["slice_axis"]), plan_orientation(plan)
    frame = volume_frame(shape, spacing, plan)
    values = list(_volume_order(frame_spacing(frame, in_plane_shape(shape, axis, orientation),
                                              in_plane_values(tuple(spacing), axis, orientation)), orientation))
    values.insert(axis, float(spacing[axis]))
    return tuple(values)


def grid_affine(affine: np.ndarray, shape: tuple[int, ...], spacing: tuple[float, ...], plan: dict) -> np.ndarray:
    """The affine of a volume on the plan's slice grid (the canvas in plane, volume axis order): canvas
    pixel c of an in-plane axis sits at original index (c - offset + 0.5) * n / resized - 0.5."""
    axis, orientation = int(plan["slice_axis"]), plan_orientation(plan)
    frame = volume_frame(shape, spacing, plan)
    resized, offset = _volume_order(frame.resized, orientation), _volume_order(frame.offset, orientation)
    out = np.asarray(affine, dtype=np.float64).copy()
    for a, length, shift in zip([a for a in range(len(shape)) if a != axis], resized, offset):
        factor = shape[a] / length
        out[:3, 3] += out[:3, a] * ((0.5 - shift) * factor - 0.5)
        out[:3, a] *= factor
    return out


def _place(slices: np.ndarray, frame: SliceFrame) -> np.ndarray:
    canvas = np.zeros((slices.shape[0], frame.size, frame.size), slices.dtype)
    inside, source = frame.windows()
    canvas[(slice(None), *inside)] = slices[(slice(None), *source)]
    return canvas


def to_frame(slices: np.ndarray, frame: SliceFrame, resize_slices: Callable = resize_image_slices) -> np.ndarray:
    """(S, H, W) slices -> (S, size, size) on the frame's canvas, resized by `resize_slices` (bicubic image;
    `resize_label_slices` or `resize_class_slices` for labels)."""
    return _place(resize_slices(slices, frame.resized), frame)


def from_frame(probabilities: np.ndarray, frame: SliceFrame, shape_hw: tuple[int, int]) -> np.ndarray:
    """(S, size, size) probabilities on the canvas -> (S, H, W), bilinear, 0 where the canvas cropped the
    slice; for thresholding in the slice's own grid."""
    resized = np.zeros((probabilities.shape[0], *frame.resized), np.float32)
    inside, source = frame.windows()
    resized[(slice(None), *source)] = probabilities[(slice(None), *inside)]
    return resize(resized, (probabilities.shape[0], *shape_hw), order=1, mode="edge", anti_aliasing=False,
                  preserve_range=True).astype(np.float32)


def volume_frame(shape: tuple[int, ...], spacing: tuple[float, ...], plan: dict | None) -> SliceFrame:
    """The frame of every slice of a volume of `shape` with voxel `spacing` (mm) under the plan (None: the
    default slice axis and size, resized)."""
    axis, orientation = int(plan["slice_axis"]) if plan else SLICE_AXIS, plan_orientation(plan)
    return slice_frame(in_plane_shape(shape, axis, orientation), in_plane_values(tuple(spacing), axis, orientation), plan)


def preprocess_volume(volume: np.ndarray, plan: dict, spacing: tuple[float, ...] = (1.0, 1.0, 1.0),
                      modality: str | None = None) -> np.ndarray:
    """(X, Y, Z) intensities of voxel `spacing` mm -> (Z, size, size) uint8 slices in the plan's orientation,
    clipped and scaled (`volume_to_uint8`: the window of `modality` where the plan has one) and placed by the
    plan's in-plane rule."""
    scaled = volume_to_uint8(volume, plan["intensity"], modality)
    frame = volume_frame(volume.shape, spacing, plan)
    return to_frame(to_slices(scaled, plan["slice_axis"], plan_orientation(plan)), frame)


def preprocess_label(label: np.ndarray, plan: dict | None = None, spacing: tuple[float, ...] = (1.0, 1.0, 1.0)
                     ) -> np.ndarray:
    """(X, Y, Z) labels -> (Z, size, size) uint8 in the plan's orientation (nearest neighbour): {0, 1}, or the
    class values when the plan has `label_classes`."""
    axis = plan["slice_axis"] if plan else SLICE_AXIS
    resize_slices = resize_class_slices if plan and plan.get("label_classes") else resize_label_slices
    return to_frame(to_slices(label, axis, plan_orientation(plan)), volume_frame(label.shape, spacing, plan),
                    resize_slices)
