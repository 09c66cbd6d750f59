"""DeSAM = PRIM (SAM's prompt encoder and decoder transformer) + PDMM, loaded from SAM or LiteMedSAM checkpoints.

The image encoder is never built or loaded here: DeSAM works on the cached neck and tap features.
A joint DeSAM segments several structures with one PRIM and one PDMM: PRIM's prompt carries a learned token
per structure (`structures`, the label values, in `config`), and `for_structure` gives the network of one.
"""
from __future__ import annotations

import copy
import os
from typing import Mapping, Sequence

import torch
from torch import nn

from desam_pipeline.network import encoders, sam_models, weights
from desam_pipeline.network.pdmm import DEFAULT_LAYOUT, PDMM
from desam_pipeline.network.prim import PRIM, UNUSED_DECODER_PARTS, Points


class DeSAM(nn.Module):
    """Decoupled SAM: `prim` scores the prompt and gives the mask embedding, `pdmm` makes the mask.

    `pdmm`: the PDMM layout, "desam" or "reference" (see `network.pdmm`); `structures`: the label values of a
    joint network (None: one structure); both recorded in `config`.
    """

    def __init__(self, tap_shapes: Sequence[Sequence[int]], prompt_frame: int, embedding_grid: int,
                 norm: str = "instance", norm_affine: bool = False, pdmm: str = DEFAULT_LAYOUT,
                 structures: Sequence[int] | None = None) -> None:
        super().__init__()
        self.config = dict(tap_shapes=[[int(v) for v in shape] for shape in tap_shapes],
                           prompt_frame=int(prompt_frame), embedding_grid=int(embedding_grid),
                           norm=norm, norm_affine=bool(norm_affine), pdmm=pdmm)
        if structures is not None:
            self.config["structures"] = [int(v) for v in structures]
        self.prim = PRIM(prompt_frame, embedding_grid, len(structures) if structures is not None else 0)
        self.pdmm = PDMM(tap_shapes, embedding_grid, norm=norm, norm_affine=norm_affine, layout=pdmm)

    @classmethod
    def for_encoder(cls, encoder: str, tap_shapes: Sequence[Sequence[int]], norm: str = "instance",
                    norm_affine: bool = False, pdmm: str = DEFAULT_LAYOUT,
                    structures: Sequence[int] | None = None) -> "DeSAM":
        """A randomly initialised DeSAM for `encoder`'s family (prompt frame, grid) and these taps."""
        geometry = encoders.family(encoder)
        return cls(tap_shapes, geometry.prompt_frame, geometry.embedding_grid, norm=norm, norm_affine=norm_affine,
                   pdmm=pdmm, structures=structures)

    @classmethod
    def from_sam_checkpoint(cls, path: str | os.PathLike, encoder: str, tap_shapes: Sequence[Sequence[int]],
                            norm: str = "instance", norm_affine: bool = False, pdmm: str = DEFAULT_LAYOUT,
                            structures: Sequence[int] | None = None) -> "DeSAM":
        """DeSAM for `encoder` and its taps with PRIM loaded strictly from a SAM or LiteMedSAM .pth file.

        `prompt_encoder.*` and `mask_decoder.*` must match exactly, except SAM's mask upscaling and
        hypernetwork heads, which PRIM does not use. PDMM starts from random weights, a joint network's
        structure tokens at the scale of the loaded point embeddings (`PRIM.init_structure_tokens`).
        """
        state = encoders.read_encoder_state(path, encoder)
        net = cls.for_encoder(encoder, tap_shapes, norm=norm, norm_affine=norm_affine, pdmm=pdmm, structures=structures)
        sam_models.load_submodule(net.prim.prompt_encoder, state, "prompt_encoder", path, encoder)
        sam_models.load_submodule(net.prim.mask_decoder, state, "mask_decoder", path, encoder,
                                  optional=UNUSED_DECODER_PARTS)
        if structures is not None:
            net.prim.init_structure_tokens()
        return net

    @classmethod
    def from_inference_state(cls, state: Mapping[str, torch.Tensor], config: Mapping,
                             source: str | os.PathLike = "checkpoint") -> "DeSAM":
        """Rebuild a trained DeSAM from `inference_state_dict()` and its `config`; a mismatch is a one-line
        error naming `source`. A config without `pdmm` (written before the option) is the "desam" layout."""
        net = cls(config["tap_shapes"], config["prompt_frame"], config["embedding_grid"],
                  norm=config.get("norm", "instance"), norm_affine=bool(config.get("norm_affine", False)),
                  pdmm=config.get("pdmm", DEFAULT_LAYOUT), structures=config.get("structures"))
        joint = f", structures {net.config['structures']}" if "structures" in net.config else ""
        weights.load_inference_state(net, state, source, f"DeSAM state for taps {net.config['tap_shapes']} and "
                                                         f"the {net.config['pdmm']!r} PDMM layout{joint}")
        return net

    def for_structure(self, value: int) -> "DeSAM":
        """A joint DeSAM prompting for the structure of label `value` only: the same modules and weights
        (nothing copied), which prediction and validation run as a single-structure network."""
        values = self.config.get("structures")
        if not values or value not in values:
            raise ValueError(f"label {value} is not a structure of this network ({values or 'one structure'})")
        view = copy.copy(self)
        view._modules = {**self._modules, "prim": self.prim.bound(values.index(value))}
        return view

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """PRIM (prompt encoder included) and PDMM weights on CPU: all prediction needs besides SAM's encoder."""
        return weights.inference_state_dict(self)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per module (for the debug output), plus trainable and total."""
        return weights.parameter_counts(self, {"prim.prompt_encoder": self.prim.prompt_encoder,
                                               "prim.mask_decoder": self.prim.mask_decoder, "pdmm": self.pdmm})

    def forward(self, neck: torch.Tensor, taps: Sequence[torch.Tensor], points: Points | None = None,
                boxes: torch.Tensor | None = None,
                structures: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (B,1,4g,4g) and predicted IoU (B,1); prompts (and a joint network's structure indices)
        as in `PRIM.forward`."""
        mask_embedding, iou = self.prim(neck, points=points, boxes=boxes, structures=structures)
        return self.pdmm(taps, mask_embedding), iou
