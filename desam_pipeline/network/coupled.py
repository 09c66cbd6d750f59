"""CoupledSAM: SAM's own prompt encoder and complete mask decoder, the baseline DeSAM decouples.

The mask comes from the decoder's mask head as in `MaskDecoder.forward(multimask_output=False)`:
the first mask token's hypernetwork output times the upscaled image tokens, i.e. low-resolution
logits of 4x the embedding size (256x256 for the 64x64 embedding), with the IoU head's first output.
Like DeSAM it works on cached neck features and takes (and ignores) the taps, so the trainer and
`inference.slice_prediction.predict_slices` drive both networks alike: `prim` scores prompts (its IoU
path is PRIM's, so `grid_iou.prompt_ious` applies) and hands on the decoder's own mask logits, and the
mask-module slot `pdmm` passes them through.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch
from torch import nn

from desam_pipeline.network import encoders, sam_models, weights
from desam_pipeline.network.prim import PRIM, Points, build_mask_decoder


class CoupledPRIM(PRIM):
    """PRIM on SAM's complete mask decoder: what it hands on is the decoder's single-mask logits."""

    def __init__(self, prompt_frame: int, embedding_grid: int) -> None:
        super().__init__(prompt_frame, embedding_grid)
        self.mask_decoder = build_mask_decoder(drop=())
        # Single-mask output uses the first mask token's hypernetwork only; the others get no gradient.
        self.mask_decoder.output_hypernetworks_mlps[1:].requires_grad_(False)

    def forward(self, neck: torch.Tensor, points: Points | None = None,
                boxes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (B,1,4h,4w) and predicted IoU (B,1) for B images (B,256,h,w) with one prompt set each."""
        decoder = self.mask_decoder
        hs, image_tokens = self.run_transformer(neck, points, boxes)
        upscaled = decoder.output_upscaling(image_tokens)
        hyper = decoder.output_hypernetworks_mlps[0](hs[:, 1, :])
        logits = (hyper.unsqueeze(1) @ upscaled.flatten(2)).view(upscaled.shape[0], 1, *upscaled.shape[2:])
        return logits, decoder.iou_prediction_head(hs[:, 0, :])[:, :1]


class PassThrough(nn.Module):
    """The mask-module slot of CoupledSAM: the decoder's logits are already the mask; taps are unused."""

    def encode_taps(self, taps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Nothing to precompute: PDMM's tap branches have no counterpart here."""
        return []

    def decode(self, branches: Sequence[torch.Tensor], mask_logits: torch.Tensor) -> torch.Tensor:
        return mask_logits

    def forward(self, taps: Sequence[torch.Tensor], mask_logits: torch.Tensor) -> torch.Tensor:
        return mask_logits


class CoupledSAM(nn.Module):
    """SAM's decoder with its own mask head, on cached image embeddings; the same call as DeSAM."""

    def __init__(self, prompt_frame: int, embedding_grid: int) -> None:
        super().__init__()
        self.config = {"network": type(self).__name__, "prompt_frame": int(prompt_frame),
                       "embedding_grid": int(embedding_grid)}
        self.prim = CoupledPRIM(prompt_frame, embedding_grid)
        self.pdmm = PassThrough()

    @classmethod
    def from_sam_checkpoint(cls, path: str | os.PathLike, encoder: str) -> "CoupledSAM":
        """Prompt encoder and complete mask decoder loaded strictly (every key) from a SAM or LiteMedSAM .pth
        file, in the prompt frame and embedding grid of `encoder`'s family."""
        state = encoders.read_encoder_state(path, encoder)
        geometry = encoders.family(encoder)
        net = cls(geometry.prompt_frame, geometry.embedding_grid)
        sam_models.load_submodule(net.prim.prompt_encoder, state, "prompt_encoder", path, encoder)
        sam_models.load_submodule(net.prim.mask_decoder, state, "mask_decoder", path, encoder)
        return net

    @classmethod
    def from_inference_state(cls, state: Mapping[str, torch.Tensor], config: Mapping,
                             source: str | os.PathLike = "checkpoint") -> "CoupledSAM":
        """Rebuild a trained CoupledSAM from `inference_state_dict()` and its `config`; a mismatch is one line
        naming `source`."""
        net = cls(config["prompt_frame"], config["embedding_grid"])
        weights.load_inference_state(net, state, source, "CoupledSAM state")
        return net

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """Prompt encoder and mask decoder weights on CPU: all prediction needs besides SAM's encoder."""
        return weights.inference_state_dict(self)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per module (for the debug output), plus trainable and total."""
        return weights.parameter_counts(self, {"prim.prompt_encoder": self.prim.prompt_encoder,
                                               "prim.mask_decoder": self.prim.mask_decoder})

    def forward(self, neck: torch.Tensor, taps: Sequence[torch.Tensor] | None = None, points: Points | None = None,
                boxes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (B,1,256,256) and predicted IoU (B,1); prompts as in `PRIM.forward`; taps unused."""
        return self.prim(neck, points=points, boxes=boxes)
