"""Frozen-encoder features of 2D slices: the neck embedding and the tapped intermediate outputs.

The slices are preprocessed exactly as the method says (see `data.preprocessing`) and fed to the
encoder as its family wants (see `encoders`): for SAM's ViT the neck of a slice equals
`SamPredictor(sam).set_image(rgb_slice).get_image_embedding()` and each tap is the raw output
of one global-attention block (all but the last), before the neck.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from desam_pipeline.network import encoders, onnx_encoder
from desam_pipeline.utilities.errors import DesamError
from desam_pipeline.utilities.runtime import autocast


def encode_slices(image_encoder: nn.Module, slices_uint8: np.ndarray, device: torch.device,
                  precision: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(B, 256, 256) uint8 -> neck (B, 256, h, w) and the taps [(B, C, H, W)] shallow to deep, as float32.

    The slices are fed as the encoder's family wants them (`encoders.encoder_input`), to torch or ONNX Runtime
    as `encoders.runtime` says.
    """
    with torch.inference_mode(), autocast(device, precision):
        x = encoders.encoder_input(image_encoder, slices_uint8, device)
        if encoders.runtime(encoders.family_of(image_encoder), device, precision) == "onnxruntime":
            return onnx_encoder.encode(image_encoder, x)
        return encoders.encode(image_encoder, x)


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
