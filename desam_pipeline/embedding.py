"""Frozen-encoder features of 2D slices: the neck embedding and the tapped intermediate outputs.

The slices are preprocessed exactly as the method says (see `preprocessing`) and fed to the
encoder as its family wants (see `encoders`): for SAM's ViT the neck of a slice equals
`SamPredictor(sam).set_image(rgb_slice).get_image_embedding()` and each tap is the raw output
of one global-attention block (all but the last), before the neck.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from desam_pipeline import encoders, preprocessing
from desam_pipeline.errors import DesamError
from desam_pipeline.orientation import plan_orientation, to_slices
from desam_pipeline.runtime import autocast

SLICE_MODES = ("foreground_margin", "foreground", "all")


def foreground_slices(label: np.ndarray, axis: int = preprocessing.SLICE_AXIS) -> list[int]:
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


def preprocess_volume(volume: np.ndarray, plan: dict) -> np.ndarray:
    """(X, Y, Z) intensities -> (Z, 256, 256) uint8 slices in the plan's orientation, clipped and scaled."""
    scaled = preprocessing.intensity_to_uint8(volume, plan["intensity"]["low_percentile"],
                                              plan["intensity"]["high_percentile"])
    return preprocessing.resize_image_slices(to_slices(scaled, plan["slice_axis"], plan_orientation(plan)),
                                             plan["slice_size"])


def preprocess_label(label: np.ndarray, plan: dict | None = None) -> np.ndarray:
    """(X, Y, Z) labels -> (Z, 256, 256) uint8 in {0, 1} in the plan's orientation (nearest neighbour)."""
    axis = plan["slice_axis"] if plan else preprocessing.SLICE_AXIS
    size = plan["slice_size"] if plan else preprocessing.SLICE_SIZE
    return preprocessing.resize_label_slices(to_slices(label, axis, plan_orientation(plan)), size)


def encode_slices(image_encoder: nn.Module, slices_uint8: np.ndarray, device: torch.device,
                  precision: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(B, 256, 256) uint8 -> neck (B, 256, h, w) and the taps [(B, C, H, W)] shallow to deep, as float32.

    The slices are fed as the encoder's family wants them (`encoders.encoder_input`).
    """
    with torch.inference_mode(), autocast(device, precision):
        return encoders.encode(image_encoder, encoders.encoder_input(image_encoder, slices_uint8, device))


def features_for_cache(neck: torch.Tensor, taps: list[torch.Tensor], dtype: np.dtype,
                       case: str) -> dict[str, np.ndarray]:
    """Cast the features to the cache dtype on their device; overflow (inf) or NaN is an error naming the case."""
    arrays = {}
    torch_dtype = getattr(torch, np.dtype(dtype).name)
    for name, tensor in [("neck", neck)] + [(f"tap{k}", t) for k, t in enumerate(taps)]:
        cast = tensor.to(torch_dtype)
        if not bool(torch.isfinite(cast).all()):
            peak = float(tensor.abs().max())
            raise DesamError(f"{case}: {name} features are not finite in {np.dtype(dtype).name} "
                             f"(max |value| {peak:.4g}); use fp32 precision or cache_dtype float32 in the plan")
        arrays[name] = cast.cpu().numpy()
    return arrays
