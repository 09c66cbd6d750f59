"""PRIM, the prompt-relevant IoU module: SAM's prompt encoder and mask decoder transformer, batched.

SAM's `MaskDecoder.predict_masks` repeats ONE image embedding per prompt, so a batch of B images
with one prompt set each cannot go through it. PRIM drives the same sub-modules (same weights, same
maths) itself: the output tokens and sparse prompt tokens go through the two-way transformer with
the image embedding (neck + dense "no mask" embedding); the IoU head's first output scores the
prompt and the transformer's updated image tokens are the mask embedding handed to PDMM.
"""
from __future__ import annotations

import torch
from segment_anything.modeling import MaskDecoder
from torch import nn

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

    def __init__(self, prompt_frame: int, embedding_grid: int) -> None:
        super().__init__()
        self.prompt_encoder = build_prompt_encoder(prompt_frame, embedding_grid)
        self.mask_decoder = build_mask_decoder()
        self.prompt_encoder.requires_grad_(False)
        self.prompt_encoder.eval()

    @property
    def frame(self) -> int:
        """Side of the square frame prompts are given in (the prompt encoder's input_image_size)."""
        return int(self.prompt_encoder.input_image_size[0])

    def train(self, mode: bool = True) -> "PRIM":
        """Train the decoder parts; the frozen prompt encoder stays in eval mode."""
        super().train(mode)
        self.prompt_encoder.eval()
        return self

    def encode_prompts(self, points: Points | None, boxes: torch.Tensor | None,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sparse tokens, dense "no mask" embedding, image positional encoding) from SAM's prompt encoder.

        Runs in float32 even under autocast: the random-Fourier positional encoding loses about
        0.05 rad of phase in bf16. SAM's own behaviour is kept, including the "not a point" padding
        token it appends to points given without a box.
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
        return sparse, dense, image_pe

    def forward(self, neck: torch.Tensor, points: Points | None = None,
                boxes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask embedding (B,256,h,w) and predicted IoU (B,1) for B images with one prompt set each.

        neck: (B,256,h,w) image embeddings; points: (coords (B,N,2) as (x, y), labels (B,N),
        1 foreground / 0 background) and boxes (B,4) as (x0, y0, x1, y1), both in the prompt
        frame (`self.frame` square).
        """
        hs, mask_embedding = self.run_transformer(neck, points, boxes)
        iou = self.mask_decoder.iou_prediction_head(hs[:, 0, :])[:, :1]
        return mask_embedding, iou

    def run_transformer(self, neck: torch.Tensor, points: Points | None = None,
                        boxes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-way transformer's output tokens (B, 5 + prompt tokens, 256), the IoU token first,
        then SAM's four mask tokens, and its updated image tokens as a map (B,256,64,64)."""
        decoder = self.mask_decoder
        sparse, dense, image_pe = self.encode_prompts(points, boxes, neck.device)
        batch = neck.shape[0]
        if sparse.shape[0] != batch:
            raise ValueError(f"{sparse.shape[0]} prompt sets for {batch} images")
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse], dim=1)
        src = neck + dense
        pos = image_pe.expand(batch, -1, -1, -1)
        hs, image_tokens = decoder.transformer(src, pos, tokens)
        return hs, image_tokens.transpose(1, 2).reshape(src.shape)
