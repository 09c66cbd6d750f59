"""Prompts in the prompt encoder's square input frame: training points from the ground truth,
whole-image box, grid.

The frame's side is the network's `prim.frame` (1024 for SAM's ViT, 256 for LiteMedSAM).
Coordinates are (x, y) = (column, row). A training pixel (row r, col c) of a 256x256 slice maps to
x = c * frame / 256, y = r * frame / 256 (4c, 4r in the 1024 frame), as the reference code's training
points do. SAM's prompt encoder adds half a pixel, so the point lands inside that pixel's footprint, off
its centre by less than half a slice pixel: kept so desam trains on the very prompts the reference
trained on.
"""
from __future__ import annotations

import numpy as np

from desam_pipeline.data.preprocessing import SLICE_SIZE

# How a slice is prompted, in training and prediction: a grid of points, or one box over the whole slice.
MODES = ("grid", "box")


def pixel_to_frame(rows: np.ndarray, cols: np.ndarray, frame: int, size: int = SLICE_SIZE) -> np.ndarray:
    """(N,2) float32 (x, y) = (cols, rows) * frame / size in the `frame` square, as the reference's training
    points (pixels of a size x size slice)."""
    scale = frame / size
    return np.stack([np.asarray(cols) * scale, np.asarray(rows) * scale], axis=-1).astype(np.float32)


def sample_training_points(labels: np.ndarray, rng: np.random.Generator,
                           foreground_probability: float = 0.5, *, frame: int,
                           on_object: bool | None = None, near: np.ndarray | None = None,
                           near_probability: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One positive click per slice of `labels` (B,256,256), on the object with `foreground_probability`.

    The pixel is drawn uniformly among the slice's foreground (label > 0) or background pixels.
    `on_object` forces the side (the balanced sampler decides it per sample); a side the slice does not
    have falls back to the other: slices without foreground get a background point, slices that are all
    foreground a foreground one. `near` (B,256,256) bool marks where the object may be (its footprint over
    the case's slices): a click off the object is drawn, with `near_probability`, among the background pixels
    inside it (when there are any). Such hard negatives teach the IoU head that a click where the object
    usually lies is not on it when the slice does not show it; clicks drawn over the whole background
    almost never fall there, so the head can learn the object's usual position instead of its presence.
    Returns coords float32 (B,1,2) (x, y) in the `frame` square, point labels int64 (B,1) all 1 (SAM is
    always told "object here"), and the IoU target float32 (B,): 1 on the object, 0 off it.
    """
    batch = labels.shape[0]
    coords = np.empty((batch, 1, 2), np.float32)
    iou_target = np.empty(batch, np.float32)
    for b in range(batch):
        foreground = labels[b] > 0
        count = int(foreground.sum())
        on = count == foreground.size or (count > 0 and (rng.random() < foreground_probability if on_object is None
                                                         else on_object))
        region = foreground if on else ~foreground
        if near is not None and not on and rng.random() < near_probability:
            inside = region & near[b]
            if inside.any():
                region = inside
        pool = np.flatnonzero(region)
        row, col = divmod(int(pool[rng.integers(pool.size)]), labels.shape[2])
        coords[b, 0] = pixel_to_frame(row, col, frame, labels.shape[2])
        iou_target[b] = float(on)
    return coords, np.ones((batch, 1), np.int64), iou_target


def whole_box(batch_size: int, frame: int) -> np.ndarray:
    """(B,4) float32 boxes (x0, y0, x1, y1) = (0, 0, frame, frame): the whole-image prompt of DeSAM-B."""
    return np.tile(np.array([0, 0, frame, frame], np.float32), (batch_size, 1))


def grid_points(k: int, frame: int) -> np.ndarray:
    """(k*k,2) float32 (x, y): centres of a k x k partition of the `frame` square, x fastest (SAM's automatic grid)."""
    side = (np.arange(k) + 0.5) / k * frame
    xs, ys = np.meshgrid(side, side)
    return np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32)
