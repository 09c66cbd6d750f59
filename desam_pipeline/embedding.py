"""Frozen-SAM features of 2D slices: the neck embedding and the tapped global-attention blocks.

The slices are preprocessed exactly as the method says (see `preprocessing`), so the neck of
a slice equals `SamPredictor(sam).set_image(rgb_slice).get_image_embedding()` and each tap is
the raw output of one global-attention block (all but the last), before the neck.
"""
from __future__ import annotations

import numpy as np
import torch
from segment_anything.modeling import ImageEncoderViT

from desam_pipeline import preprocessing
from desam_pipeline.errors import DesamError
from desam_pipeline.orientation import plan_orientation, to_slices
from desam_pipeline.runtime import autocast
from desam_pipeline.sam_models import tap_indices

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


def feature_shapes(image_encoder: ImageEncoderViT) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of every cached feature: `neck`, then `tap0`.. shallow to deep."""
    grid = image_encoder.img_size // image_encoder.patch_embed.proj.stride[0]
    width = image_encoder.patch_embed.proj.out_channels
    shapes = {"neck": (image_encoder.neck[0].out_channels, grid, grid)}
    for k, _ in enumerate(tap_indices(image_encoder)):
        shapes[f"tap{k}"] = (width, grid, grid)
    return shapes


def encode_slices(image_encoder: ImageEncoderViT, slices_uint8: np.ndarray, device: torch.device,
                  precision: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(B, 256, 256) uint8 -> neck (B, 256, 64, 64) and the taps [(B, C, 64, 64)] as float32.

    The taps are caught with forward hooks on the tapped blocks (channels-last outputs,
    permuted to channels-first), so the encoder runs once, unmodified.
    """
    captured: dict[int, torch.Tensor] = {}

    def catch(k: int):
        def hook(_module, _inputs, output):
            captured[k] = output
        return hook

    handles = [image_encoder.blocks[i].register_forward_hook(catch(k))
               for k, i in enumerate(tap_indices(image_encoder))]
    try:
        with torch.inference_mode(), autocast(device, precision):
            neck = image_encoder(preprocessing.sam_input(slices_uint8, device))
    finally:
        for handle in handles:
            handle.remove()
    taps = [captured[k].permute(0, 3, 1, 2).float().contiguous() for k in range(len(handles))]
    return neck.float(), taps


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
