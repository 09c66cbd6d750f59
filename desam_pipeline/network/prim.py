"""PRIM, the prompt-relevant IoU module: SAM's prompt encoder and mask decoder transformer, batched.

SAM's `MaskDecoder.predict_masks` repeats ONE image embedding per prompt, so a batch of B images
with one prompt set each cannot go through it. PRIM drives the same sub-modules (same weights, same
maths) itself: the output tokens and sparse prompt tokens go through the two-way transformer with
the image embedding (neck + dense "no mask" embedding); the IoU head's first output scores the
prompt and the transformer's updated image tokens are the mask embedding handed to PDMM.

A joint PRIM (one network for several structures) holds one learned token per structure, added to every
sparse prompt token: the prompt then says "this point, for this structure". `init_structure_tokens` draws them
at the scale of SAM's own learned point-type embeddings (zero tokens would leave it exactly SAM's prompt, but
they stay too small to tell the structures apart: measured, docs/abdominal.md).
"""
from __future__ import annotations

import copy

import torch
from segment_anything.modeling import MaskDecoder
from torch import nn
from torch.nn.functional import embedding

from desam_pipeline.network import sam_models
from desam_pipeline.network.sam_models import build_prompt_encoder

# MaskDecoder parts PRIM does not use; they are dropped and may be absent from a checkpoint.
UNUSED_DECODER_PARTS = ("output_upscaling", "output_hypernetworks_mlps")

Points = tuple[torch.Tensor, torch.Tensor]


def build_mask_decoder(drop: tuple[str, ...] = UNUSED_DECODER_PARTS) -> MaskDecoder:
    """SAM's mask decoder without the parts in `drop` (by default the mask upscaling and hypernetwork heads,
    which PRIM does not use)."""
    return sam_models.build_mask_decoder(drop)


class PRIM(nn.Module):
    """Prompt encoder (frozen, always in eval mode) + SAM's decoder transformer, IoU token and IoU head."""

    def __init__(self, prompt_frame: int, embedding_grid: int, structures: int = 0) -> None:
        """`structures`: how many structures a joint PRIM prompts for (0: one structure, no tokens)."""
        super().__init__()
        self.prompt_encoder = build_prompt_encoder(prompt_frame, embedding_grid)
        self.mask_decoder = build_mask_decoder()
        self.prompt_encoder.requires_grad_(False)
        self.prompt_encoder.eval()
        self.structure_tokens = (nn.Parameter(torch.zeros(structures, self.mask_decoder.transformer_dim))
                                 if structures else None)
        self.structure: int | None = None  # the structure index a bound joint PRIM prompts for (`bound`)

    @torch.no_grad()
    def init_structure_tokens(self) -> None:
        """Draw a joint PRIM's structure tokens (normal, from torch's global generator) at the scale of the loaded
        foreground-point embedding: each token's expected norm is that embedding's, so two structures differ as
        much as SAM's foreground and background points do."""
        foreground = self.prompt_encoder.point_embeddings[1].weight
        std = float(foreground.norm()) / foreground.numel() ** 0.5
        self.structure_tokens.normal_(0.0, std)

    def bound(self, structure: int) -> "PRIM":
        """This joint PRIM prompting for structure index `structure` only: the same sub-modules and weights
        (nothing copied), so per-structure prediction code runs it as a single-structure PRIM."""
        if self.structure_tokens is None or not 0 <= structure < self.structure_tokens.shape[0]:
            raise ValueError(f"structure index {structure} is not one of this PRIM's")
        view = copy.copy(self)
        view._modules, view._parameters = dict(self._modules), dict(self._parameters)
        view.structure = int(structure)
        return view

    @property
    def frame(self) -> int:
        """Side of the square frame prompts are given in (the prompt encoder's input_image_size)."""
        return int(self.prompt_encoder.input_image_size[0])

    def train(self, mode: bool = True) -> "PRIM":
        """Train the decoder parts; the frozen prompt encoder stays in eval mode."""
        super().train(mode)
        self.prompt_encoder.eval()
        return self

    def encode_prompts(self, points: Points | None, boxes: torch.Tensor | None, device: torch.device,
                       structures: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sparse tokens, dense "no mask" embedding, image positional encoding) from SAM's prompt encoder.

        Runs in float32 even under autocast: the random-Fourier positional encoding loses about
        0.05 rad of phase in bf16. SAM's own behaviour is kept, including the "not a point" padding
        token it appends to points given without a box. A joint PRIM adds each prompt set's structure
        token (`structures` (B,) indices, else the bound structure's) to every sparse token.
        """
        if points is None and boxes is None:
            raise ValueError("PRIM needs point or box prompts")
        if points is not None:
            points = (points[0].to(device, torch.float32), points[1].to(device))
        if boxes is not None:
            boxes = boxes.to(device, torch.float32)
        with torch.autocast(device_type=device.type, enabled=False):
            sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
            image_pe = self.prompt_encoder.get_dense_pe()
            sparse = self._add_structure_tokens(sparse, structures)
        return sparse, dense, image_pe

    def _add_structure_tokens(self, sparse: torch.Tensor, structures: torch.Tensor | None) -> torch.Tensor:
        """`sparse` (B,N,C) plus each prompt set's structure token (joint PRIM); unchanged for one structure."""
        if self.structure_tokens is None:
            if structures is not None:
                raise ValueError("a single-structure PRIM takes no structure indices")
            return sparse
        if structures is None:
            if self.structure is None:
                raise ValueError("a joint PRIM needs the structure of each prompt set (or `bound`)")
            structures = torch.full(sparse.shape[:1], self.structure, dtype=torch.int64)
        tokens = embedding(structures.to(sparse.device, torch.int64), self.structure_tokens.float())
        return sparse + tokens[:, None, :]

    def forward(self, neck: torch.Tensor, points: Points | None = None, boxes: torch.Tensor | None = None,
                structures: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask embedding (B,256,h,w) and predicted IoU (B,1) for B images with one prompt set each.

        neck: (B,256,h,w) image embeddings; points: (coords (B,N,2) as (x, y), labels (B,N),
        1 foreground / 0 background) and boxes (B,4) as (x0, y0, x1, y1), both in the prompt
        frame (`self.frame` square); structures: a joint PRIM's structure index per prompt set (B,).
        """
        hs, mask_embedding = self.run_transformer(neck, points, boxes, structures)
        iou = self.mask_decoder.iou_prediction_head(hs[:, 0, :])[:, :1]
        return mask_embedding, iou

    def run_transformer(self, neck: torch.Tensor, points: Points | None = None, boxes: torch.Tensor | None = None,
                        structures: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-way transformer's output tokens (B, 5 + prompt tokens, 256), the IoU token first,
        then SAM's four mask tokens, and its updated image tokens as a map (B,256,64,64)."""
        decoder = self.mask_decoder
        sparse, dense, image_pe = self.encode_prompts(points, boxes, neck.device, structures)
        batch = neck.shape[0]
        if sparse.shape[0] != batch:
            raise ValueError(f"{sparse.shape[0]} prompt sets for {batch} images")
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse], dim=1)
        src = neck + dense
        pos = image_pe.expand(batch, -1, -1, -1)
        hs, image_tokens = decoder.transformer(src, pos, tokens)
        return hs, image_tokens.transpose(1, 2).reshape(src.shape)
