"""The method's slice preprocessing, identical for embedding, training targets and prediction.

Volume -> clip to the 0.5/99.5 percentiles -> 0..255 uint8 (exact zeros stay 0) -> axial
slices resized to 256x256 (bicubic image, nearest label). What the image encoder is then fed
depends on its family (see `encoders`); `sam_input` is the ViT family's.
"""
from __future__ import annotations

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide
from skimage.transform import resize

from desam_pipeline.sam_models import PIXEL_MEAN, PIXEL_STD

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


def resize_probabilities_back(probabilities: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """(S, 256, 256) float probabilities -> (S, H, W), bilinear, for thresholding in the slice's own grid."""
    return resize(probabilities.astype(np.float32), (probabilities.shape[0], *shape_hw), order=1,
                  mode="edge", anti_aliasing=False, preserve_range=True).astype(np.float32)


def sam_input(slices_uint8: np.ndarray, device: torch.device | str, size: int) -> torch.Tensor:
    """(B, S, S) uint8 -> (B, 3, size, size) float32 normalised, exactly as SamPredictor.set_image for
    a SAM ViT of input side `size`.

    Uses ResizeLongestSide.apply_image (PIL bilinear on uint8), then Sam.preprocess's
    normalisation; square slices need no padding.
    """
    rgb = np.repeat(slices_uint8[..., None], 3, axis=-1)
    resize = ResizeLongestSide(size)
    resized = np.stack([resize.apply_image(img) for img in rgb])
    x = torch.as_tensor(resized, device=device).permute(0, 3, 1, 2).contiguous().float()
    mean = torch.tensor(PIXEL_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std
