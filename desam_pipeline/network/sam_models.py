"""Build and load SAM from segment_anything's own classes: the real variants and a tiny test config.

Real variants load only from the official checkpoint files given by path; nothing is
downloaded. Every load is strict and fails with one line naming the file and the problem.
"""
from __future__ import annotations

import inspect
import os
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from desam_pipeline.io.atomic import save_torch
from desam_pipeline.utilities.errors import DesamError

ENCODER_SPECS: dict[str, dict] = {
    "vit_h": dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                  encoder_global_attn_indexes=[7, 15, 23, 31]),
    "vit_l": dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                  encoder_global_attn_indexes=[5, 11, 17, 23]),
    "vit_b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                  encoder_global_attn_indexes=[2, 5, 8, 11]),
    # Real geometry (1024 input, patch 16, 64x64 grid, 256-wide neck and decoder, four
    # global-attention blocks between windowed ones), small width and depth.
    "tiny": dict(encoder_embed_dim=32, encoder_depth=8, encoder_num_heads=1,
                 encoder_global_attn_indexes=[1, 3, 5, 7]),
}
ENCODERS = tuple(ENCODER_SPECS)
TINY_SEED = 0
# SAM's geometry, as segment_anything's model registry builds every variant.
IMAGE_SIZE = 1024
PATCH_SIZE = 16
EMBED_DIM = 256
NUM_MULTIMASK_OUTPUTS = 3
_SAM_DEFAULTS = inspect.signature(Sam.__init__).parameters
PIXEL_MEAN = tuple(_SAM_DEFAULTS["pixel_mean"].default)
PIXEL_STD = tuple(_SAM_DEFAULTS["pixel_std"].default)


def build_image_encoder_vit(encoder: str) -> ImageEncoderViT:
    """segment_anything's ViT image encoder of a variant, with the arguments of its model registry."""
    spec = ENCODER_SPECS[encoder]
    return ImageEncoderViT(depth=spec["encoder_depth"], embed_dim=spec["encoder_embed_dim"], img_size=IMAGE_SIZE,
                           mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                           num_heads=spec["encoder_num_heads"], patch_size=PATCH_SIZE, qkv_bias=True,
                           use_rel_pos=True, global_attn_indexes=spec["encoder_global_attn_indexes"], window_size=14,
                           out_chans=EMBED_DIM)


def build_prompt_encoder(prompt_frame: int, embedding_grid: int) -> PromptEncoder:
    """segment_anything's PromptEncoder for a prompt frame and neck grid (SAM's other arguments)."""
    return PromptEncoder(embed_dim=EMBED_DIM, image_embedding_size=(embedding_grid, embedding_grid),
                         input_image_size=(prompt_frame, prompt_frame), mask_in_chans=16)


def build_mask_decoder(drop: tuple[str, ...] = ()) -> MaskDecoder:
    """SAM's mask decoder (identical for every variant), minus the sub-modules named in `drop`."""
    decoder = MaskDecoder(
        num_multimask_outputs=NUM_MULTIMASK_OUTPUTS,
        transformer=TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=256)
    for name in drop:
        delattr(decoder, name)
    return decoder


def _assemble_sam(encoder: str) -> Sam:
    """SAM from segment_anything's public modules, built in its registry's order, in eval mode."""
    image_encoder = build_image_encoder_vit(encoder)
    prompt_encoder = build_prompt_encoder(IMAGE_SIZE, IMAGE_SIZE // PATCH_SIZE)
    mask_decoder = build_mask_decoder()
    return Sam(image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder,
               pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD)).eval()


def build_sam(encoder: str, seed: int | None = None) -> Sam:
    """A randomly initialised SAM of the given variant (seeded when `seed` is given), in eval mode."""
    if encoder not in ENCODER_SPECS:
        raise DesamError(f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
    if seed is None:
        return _assemble_sam(encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _assemble_sam(encoder)


def tap_indices(image_encoder: ImageEncoderViT) -> list[int]:
    """Blocks whose outputs DeSAM caches: the global-attention ones (window_size == 0) but the last."""
    globals_ = [i for i, block in enumerate(image_encoder.blocks) if block.window_size == 0]
    return globals_[:-1]


def encoder_width(encoder: str) -> int:
    """Channel width of the tapped features of a variant (its ViT embedding dimension)."""
    return ENCODER_SPECS[encoder]["encoder_embed_dim"]


def _load_mapped(path: Path) -> dict:
    """torch.load with the tensors memory-mapped: parts never used (the 2.5 GB vit_h image encoder
    when training reads only the decoder) are not read into memory. Legacy non-zip files cannot be
    mapped and are read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a SAM .pth file on CPU; a missing, unreadable or non-SAM file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise DesamError(f"{path}: SAM checkpoint not found")
    try:
        state = _load_mapped(path)
    except Exception as exc:
        raise DesamError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__})") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not any(str(k).startswith("image_encoder.") for k in state) \
            and not any(str(k).startswith("mask_decoder.") for k in state):
        raise DesamError(f"{path}: not a SAM checkpoint (no image_encoder.* or mask_decoder.* weights)")
    return state


def detect_encoder(state: dict[str, torch.Tensor], path: str | os.PathLike = "checkpoint") -> str:
    """Tell the SAM variant of a state dict from its encoder width and depth."""
    try:
        width = state["image_encoder.patch_embed.proj.weight"].shape[0]
        depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks."))
    except (KeyError, ValueError) as exc:
        raise DesamError(f"{path}: no SAM image encoder weights to detect the variant from") from exc
    for name, spec in ENCODER_SPECS.items():
        if spec["encoder_embed_dim"] == width and spec["encoder_depth"] == depth:
            return name
    raise DesamError(f"{path}: image encoder of width {width} and depth {depth} matches no SAM variant")


def load_submodule(module: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str,
                   path: str | os.PathLike, encoder: str, optional: tuple[str, ...] = ()) -> None:
    """Load `prefix.*` of a SAM state dict into `module` strictly.

    Keys of the module that start with one of `optional` may be absent from the file (and
    file keys under them are ignored); every other missing, unexpected or mis-shaped key is
    an error naming the file and the variant.
    """
    sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    own = module.state_dict()
    missing = [k for k in own if k not in sub and not k.startswith(optional)]
    unexpected = [k for k in sub if k not in own and not k.startswith(optional)]
    wrong = [f"{k} {tuple(sub[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in sub and sub[k].shape != v.shape]
    if missing or unexpected or wrong:
        problems = []
        if wrong:
            problems.append(f"{len(wrong)} shape mismatches (first: {wrong[0]})")
        if missing:
            problems.append(f"{len(missing)} missing keys (first: {prefix}.{missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (first: {prefix}.{unexpected[0]})")
        raise DesamError(f"{path}: does not match SAM {encoder} {prefix}: " + "; ".join(problems))
    module.load_state_dict({k: v for k, v in sub.items() if k in own}, strict=False)


def save_sam_checkpoint(sam: Sam, target: str | os.PathLike) -> Path:
    """Save a SAM's state dict the way the official .pth files are laid out (flat keys).

    Saved through a buffer: torch.save records a file's name inside the archive, so the same weights
    would hash differently with every temporary name (plans record the file's sha256).
    """
    save_torch(sam.state_dict(), target)
    return Path(target)


def ensure_tiny_checkpoint(target: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Write the seeded random tiny SAM to `target` unless it is already there."""
    target = Path(target)
    if not target.is_file():
        save_sam_checkpoint(build_sam("tiny", seed=seed), target)
    return target
