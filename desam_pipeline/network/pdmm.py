"""PDMM, the prompt-decoupled mask module: a UNETR-like decoder on SAM's frozen multi-scale features.

Three branches lift the tapped ViT blocks (shallow -> deep) to 256, 128 and 64 px; PRIM's mask
embedding meets the deepest branch at the 64x64 bottleneck (the only place the prompt reaches the
mask); two decoder stages with skips and a 1x1 head give mask logits at 256x256.
Layer-by-layer as in the DeSAM paper's reference code (see DESAM_METHOD.md).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from desam_pipeline.errors import DesamError

NORMS = ("instance", "batch")
SE_REDUCTION = 16
LEAKY_SLOPE = 0.01


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

    As in the reference, the gate follows an InstanceNorm: the pooled input is then the per-channel
    mean of a normalised map (0, or the norm's bias when affine), so the gate is a learned
    per-channel constant rather than an input-dependent one. With norm="batch" it sees real means.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // SE_REDUCTION, 1)
        self.gate = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.gate(x.mean(dim=(2, 3)))
        return x * weights[:, :, None, None]


class SEResBlock(nn.Module):
    """conv3x3-norm-LeakyReLU-conv3x3-norm-SE, plus the residual (1x1 conv + norm if channels change), LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, affine: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = make_norm(norm, out_channels, affine)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_channels, affine)
        self.se = SqueezeExcitation(out_channels)
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
        self.residual = nn.Identity() if in_channels == out_channels else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), make_norm(norm, out_channels, affine))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.se(self.norm2(self.conv2(out)))
        return self.act(out + self.residual(x))


class PDMM(nn.Module):
    """Mask logits (B,1,256,256) from three tapped feature maps (B,tap_width,64,64) and a mask embedding."""

    def __init__(self, tap_width: int, norm: str = "instance", norm_affine: bool = False) -> None:
        super().__init__()
        self.tap_width = tap_width

        def srb(cin: int, cout: int) -> SEResBlock:
            return SEResBlock(cin, cout, norm, norm_affine)

        self.shallow = nn.Sequential(srb(tap_width, 64), upsample(64, 64), srb(64, 64),
                                     upsample(64, 64), srb(64, 64))
        self.middle = nn.Sequential(srb(tap_width, 128), upsample(128, 128), srb(128, 128))
        self.deep = srb(tap_width, 256)
        self.bottleneck = srb(512, 256)
        self.up1 = upsample(256, 128)
        self.decoder1 = srb(256, 128)
        self.up2 = upsample(128, 64)
        self.decoder2 = srb(128, 64)
        self.head = nn.Conv2d(64, 1, kernel_size=1)

    def forward(self, taps: Sequence[torch.Tensor], mask_embedding: torch.Tensor) -> torch.Tensor:
        """taps: the three cached feature maps, shallow to deep; mask_embedding: PRIM's (B,256,64,64)."""
        if len(taps) != 3 or any(t.shape[1] != self.tap_width for t in taps):
            raise ValueError(f"PDMM expects 3 taps of {self.tap_width} channels, got "
                             f"{[tuple(t.shape) for t in taps]}")
        shallow, middle, deep = taps
        x = self.bottleneck(torch.cat([mask_embedding, self.deep(deep)], dim=1))
        x = self.decoder1(torch.cat([self.up1(x), self.middle(middle)], dim=1))
        x = self.decoder2(torch.cat([self.up2(x), self.shallow(shallow)], dim=1))
        return self.head(x)
