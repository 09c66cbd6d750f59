"""The method's slice preprocessing, identical for embedding, training targets and prediction.

Volume -> clip to the 0.5/99.5 percentiles -> 0..255 uint8 (exact zeros stay 0) -> axial
slices resized to 256x256 (bicubic image, nearest label). What the image encoder is then fed
depends on its family (see `network.encoders`).

CT (a modality with a window in the plan's `intensity.windows`, e.g. {"CT": [low, high]} from the
foreground intensity percentiles of the fingerprint, as nnU-Net does) is clipped to that fixed window
instead, the same for every case, with no special zero (0 HU is water). Labels are {0, 1} (label > 0),
or keep their class values when the plan lists `label_classes` (a dataset with several structures).
"""
from __future__ import annotations

import numpy as np
from skimage.transform import resize

from desam_pipeline.data.orientation import plan_orientation, to_slices

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


def resize_image_slices(slices: np.ndarray, size: int = SLICE_SIZE) -> np.ndarray:
    """(S, H, W) uint8 -> (S, size, size) uint8, bicubic."""
    out = resize(slices.astype(np.float32), (slices.shape[0], size, size), order=3,
                 mode="edge", anti_aliasing=False, preserve_range=True)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def resize_label_slices(slices: np.ndarray, size: int = SLICE_SIZE) -> np.ndarray:
    """(S, H, W) labels -> (S, size, size) uint8 in {0, 1}, nearest neighbour."""
    out = resize((slices > 0).astype(np.uint8), (slices.shape[0], size, size), order=0,
                 mode="edge", anti_aliasing=False, preserve_range=True)
    return (out > 0).astype(np.uint8)


def resize_class_slices(slices: np.ndarray, size: int = SLICE_SIZE) -> np.ndarray:
    """(S, H, W) class labels -> (S, size, size) uint8 keeping each voxel's class, nearest neighbour."""
    out = resize(np.asarray(slices).astype(np.uint8), (slices.shape[0], size, size), order=0,
                 mode="edge", anti_aliasing=False, preserve_range=True)
    return np.round(out).astype(np.uint8)


def resize_probabilities_back(probabilities: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """(S, 256, 256) float probabilities -> (S, H, W), bilinear, for thresholding in the slice's own grid."""
    return resize(probabilities.astype(np.float32), (probabilities.shape[0], *shape_hw), order=1,
                  mode="edge", anti_aliasing=False, preserve_range=True).astype(np.float32)


def preprocess_volume(volume: np.ndarray, plan: dict, modality: str | None = None) -> np.ndarray:
    """(X, Y, Z) intensities -> (Z, 256, 256) uint8 slices in the plan's orientation, clipped and scaled
    (`volume_to_uint8`: the window of `modality` where the plan has one)."""
    scaled = volume_to_uint8(volume, plan["intensity"], modality)
    return resize_image_slices(to_slices(scaled, plan["slice_axis"], plan_orientation(plan)),
                                             plan["slice_size"])


def preprocess_label(label: np.ndarray, plan: dict | None = None) -> np.ndarray:
    """(X, Y, Z) labels -> (Z, 256, 256) uint8 in the plan's orientation (nearest neighbour): {0, 1}, or the
    class values when the plan has `label_classes`."""
    axis = plan["slice_axis"] if plan else SLICE_AXIS
    size = plan["slice_size"] if plan else SLICE_SIZE
    resize_slices = resize_class_slices if plan and plan.get("label_classes") else resize_label_slices
    return resize_slices(to_slices(label, axis, plan_orientation(plan)), size)
