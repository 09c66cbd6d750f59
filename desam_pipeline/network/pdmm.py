"""PDMM, the prompt-decoupled mask module: a UNETR-like decoder on SAM's frozen multi-scale features.

Three branches lift the tapped encoder features (shallow -> deep) to 4x, 2x and 1x the embedding
grid (256, 128 and 64 px for a 64 grid); PRIM's mask embedding meets the deepest branch at the
bottleneck (the only place the prompt reaches the mask); two decoder stages with skips and a 1x1
head give mask logits at 4x the grid. Each branch has as many x2 up-samplings as its tap's
(C, H, W) needs, so one class serves SAM's ViT taps (all at the grid) and TinyViT's (the shallow
one already at 2x).

Two layouts (`layout`), identical except for biases:
- "reference": as the DeSAM reference code builds it: the SE gate's two Linear layers and the 1x1 head
  have no bias. After a non-affine InstanceNorm every channel of the SE input averages to 0, so the gate
  is sigmoid(W2 relu(W1 0)) = sigmoid(0) = 0.5 for every channel and input, and its weights get only
  rounding noise as gradient: each SE block scales by a fixed 0.5 and its gate never learns.
- "desam" (the default: tied with "reference" in the accuracy benchmark, and only its gates can learn): the
  same blocks with biases in both SE Linear layers and in the head. After the non-affine InstanceNorm the
  gate is then sigmoid(W2 relu(b1) + b2), a trained per-channel scale that does not depend on the input.
With norm="batch" the gate sees real channel means in both layouts; after an affine InstanceNorm its input
is the norm's bias, a trained per-channel constant.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from desam_pipeline.utilities.errors import DesamError

NORMS = ("instance", "batch")
LAYOUTS = ("desam", "reference")
DEFAULT_LAYOUT = "desam"
SE_REDUCTION = 16
LEAKY_SLOPE = 0.01


def check_layout(layout: str) -> str:
    """`layout` if it is one of LAYOUTS, else a one-line error."""
    if layout not in LAYOUTS:
        raise DesamError(f"unknown PDMM layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return layout


def make_norm(norm: str, channels: int, affine: bool) -> nn.Module:
    """InstanceNorm2d (the reference, affine=False there) or BatchNorm2d."""
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=affine)
    if norm == "batch":
        return nn.BatchNorm2d(channels, affine=affine)
    raise DesamError(f"unknown PDMM norm {norm!r}; choose one of {', '.join(NORMS)}")


def upsample(in_channels: int, out_channels: int) -> nn.ConvTranspose2d:
    """x2 upsampling: transposed convolution, kernel 2, stride 2, no bias."""
    return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, bias=False)


class SqueezeExcitation(nn.Module):
    """Channel gate: global average pool, Linear C->C/16, ReLU, Linear C/16->C, Sigmoid, rescale.

    The gate follows an InstanceNorm, so with a non-affine norm its input is 0: without `bias` (the
    reference) the gate is exactly 0.5, with `bias` a trained per-channel constant (see the module text).
    """

    def __init__(self, channels: int, bias: bool = True) -> None:
        super().__init__()
        hidden = max(channels // SE_REDUCTION, 1)
        self.gate = nn.Sequential(nn.Linear(channels, hidden, bias=bias), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, channels, bias=bias), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.gate(x.mean(dim=(2, 3)))
        return x * weights[:, :, None, None]


class SEResBlock(nn.Module):
    """conv3x3-norm-LeakyReLU-conv3x3-norm-SE, plus the residual (1x1 conv + norm if channels change), LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, affine: bool, se_bias: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = make_norm(norm, out_channels, affine)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_channels, affine)
        self.se = SqueezeExcitation(out_channels, bias=se_bias)
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
        self.residual = nn.Identity() if in_channels == out_channels else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), make_norm(norm, out_channels, affine))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.se(self.norm2(self.conv2(out)))
        return self.act(out + self.residual(x))


def upsamplings(size: int, target: int) -> int:
    """Number of x2 up-samplings taking a `size` map to `target`; other ratios are an error."""
    steps = math.log2(target / size) if size > 0 else -1.0
    if steps < 0 or steps != int(steps):
        raise DesamError(f"a {size}-px tap cannot reach {target} px by x2 up-sampling")
    return int(steps)


class PDMM(nn.Module):
    """Mask logits (B,1,4g,4g) from three tapped feature maps (shallow -> deep) and a (B,256,g,g) mask embedding.

    `tap_shapes`: the taps' (C, H, W); `embedding_grid`: g, the side of the mask embedding; `layout`:
    "desam" (biases in the SE gates and the head) or "reference" (none, as the reference code).
    """

    def __init__(self, tap_shapes: Sequence[Sequence[int]], embedding_grid: int, norm: str = "instance",
                 norm_affine: bool = False, layout: str = DEFAULT_LAYOUT) -> None:
        super().__init__()
        self.layout = check_layout(layout)
        bias = layout == "desam"
        self.tap_shapes = [tuple(int(v) for v in shape) for shape in tap_shapes]
        if len(self.tap_shapes) != 3 or any(len(shape) != 3 or shape[1] != shape[2] for shape in self.tap_shapes):
            raise DesamError(f"PDMM needs three square taps (C, H, W), got {self.tap_shapes}")

        def srb(cin: int, cout: int) -> SEResBlock:
            return SEResBlock(cin, cout, norm, norm_affine, se_bias=bias)

        def branch(shape: tuple[int, int, int], width: int, target: int) -> nn.Module:
            layers = [srb(shape[0], width)]
            for _ in range(upsamplings(shape[1], target)):
                layers += [upsample(width, width), srb(width, width)]
            return layers[0] if len(layers) == 1 else nn.Sequential(*layers)

        shallow, middle, deep = self.tap_shapes
        self.shallow = branch(shallow, 64, 4 * embedding_grid)
        self.middle = branch(middle, 128, 2 * embedding_grid)
        self.deep = branch(deep, 256, embedding_grid)
        self.bottleneck = srb(512, 256)
        self.up1 = upsample(256, 128)
        self.decoder1 = srb(256, 128)
        self.up2 = upsample(128, 64)
        self.decoder2 = srb(128, 64)
        self.head = nn.Conv2d(64, 1, kernel_size=1, bias=bias)

    def encode_taps(self, taps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The three tap branches [shallow (B,64,4g,4g), middle (B,128,2g,2g), deep (B,256,g,g)]: everything
        that does not depend on the prompt, so grid mode computes it once per slice for all its points."""
        if len(taps) != 3 or any(tuple(t.shape[1:]) != shape for t, shape in zip(taps, self.tap_shapes)):
            raise ValueError(f"PDMM expects 3 taps of shapes {self.tap_shapes}, got "
                             f"{[tuple(t.shape[1:]) for t in taps]}")
        shallow, middle, deep = taps
        return [self.shallow(shallow), self.middle(middle), self.deep(deep)]

    def decode(self, branches: Sequence[torch.Tensor], mask_embedding: torch.Tensor) -> torch.Tensor:
        """Mask logits (B,1,4g,4g) from `encode_taps`' branches and PRIM's (B,256,g,g) mask embedding: the
        prompt-dependent part (bottleneck fusion, decoder, head). Branches of batch 1 may be expanded to B."""
        shallow, middle, deep = branches
        x = self.bottleneck(torch.cat([mask_embedding, deep], dim=1))
        x = self.decoder1(torch.cat([self.up1(x), middle], dim=1))
        x = self.decoder2(torch.cat([self.up2(x), shallow], dim=1))
        return self.head(x)

    def forward(self, taps: Sequence[torch.Tensor], mask_embedding: torch.Tensor) -> torch.Tensor:
        """taps: the three cached feature maps, shallow to deep; mask_embedding: PRIM's (B,256,g,g)."""
        return self.decode(self.encode_taps(taps), mask_embedding)
