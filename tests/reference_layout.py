"""Test-only: a network laid out as the DeSAM reference code's, with its module and parameter names.

The reference builds SAM (`image_encoder`, `prompt_encoder`, `mask_decoder`) whose mask decoder also holds
`pimm`: MONAI-style blocks (each convolution wrapped in a module with one child `conv`, no biases,
non-affine InstanceNorm, SE gates without biases, a 1x1 residual convolution built in every block but
used only when the channels change), three context branches (deep first), a fusion block, two
up-blocks and a 1x1 head per up-block of which only the last is returned. Its scripts save
`model.state_dict()` of the whole SAM. Written from the reference's structure for the import and
parameter-count tests; nothing here is imported by desam.
"""
from __future__ import annotations

import torch
from torch import nn

from desam_pipeline.network.prim import build_mask_decoder

LEAKY_SLOPE = 0.01


class Conv(nn.Sequential):
    """A bare convolution under the child name `conv` (as MONAI's Convolution with conv_only=True)."""

    def __init__(self, cin: int, cout: int, kernel: int, transposed: bool = False) -> None:
        super().__init__()
        if transposed:
            self.add_module("conv", nn.ConvTranspose2d(cin, cout, kernel, stride=kernel, bias=False))
        else:
            self.add_module("conv", nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False))


class SELayer(nn.Module):
    def __init__(self, channel: int, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(channel, channel // reduction, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(channel // reduction, channel, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        return x * self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)


class UnetResSEBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = Conv(cin, cout, 3)
        self.conv2 = Conv(cout, cout, 3)
        self.conv3 = Conv(cin, cout, 1)
        self.lrelu = nn.LeakyReLU(LEAKY_SLOPE)
        self.norm1, self.norm2, self.norm3 = (nn.InstanceNorm2d(cout) for _ in range(3))
        self.downsample = cin != cout
        self.se = SELayer(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.se(self.norm2(self.conv2(self.lrelu(self.norm1(self.conv1(x))))))
        residual = self.norm3(self.conv3(x)) if self.downsample else x
        return self.lrelu(out + residual)


class PreUpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_layer: int) -> None:
        super().__init__()
        self.block_init = UnetResSEBlock(cin, cout)
        self.residual_block = nn.ModuleList(
            nn.Sequential(Conv(cout, cout, 2, transposed=True), UnetResSEBlock(cout, cout)) for _ in range(num_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_init(x)
        for block in self.residual_block:
            x = block(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.transp_conv = Conv(cin, cout, 2, transposed=True)
        self.res_block = UnetResSEBlock(2 * cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.res_block(torch.cat((self.transp_conv(x), skip), dim=1))


class PIMMDecoder(nn.Module):
    """The reference's PDMM for taps of `width` channels (deep supervision off, as its scripts use it)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        sizes = [256, 128, 64]
        self.conv_blocks_context = nn.ModuleList(PreUpBlock(width, sizes[d], d) for d in range(3))
        self.conv_blocks_localization = nn.ModuleList(UpBlock(sizes[u], sizes[u + 1]) for u in range(2))
        self.seg_outputs = nn.ModuleList(nn.Conv2d(sizes[u + 1], 1, 1, 1, 0, 1, 1, False) for u in range(2))
        self.mask_embedding_fusion = UnetResSEBlock(512, 256)

    def forward(self, mask_embedding: torch.Tensor, taps: list[torch.Tensor]) -> torch.Tensor:
        skips = []
        for d, block in enumerate(self.conv_blocks_context):
            embed = block(taps[-(d + 1)])
            if d == 0:
                embed = self.mask_embedding_fusion(torch.cat((mask_embedding, embed), dim=1))
            skips.append(embed)
        x, outputs = skips[0], []
        for u, block in enumerate(self.conv_blocks_localization):
            x = block(x, skips[u + 1])
            outputs.append(self.seg_outputs[u](x))
        return outputs[-1]


class ReferenceSam(nn.Module):
    """`image_encoder` and `prompt_encoder` of a SAM, and its complete mask decoder with `pimm` added."""

    def __init__(self, sam: nn.Module, width: int) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = build_mask_decoder(drop=())
        self.mask_decoder.load_state_dict(sam.mask_decoder.state_dict())
        self.mask_decoder.pimm = PIMMDecoder(width)

    def forward(self, neck: torch.Tensor, taps: list[torch.Tensor], points=None, boxes=None):
        """The reference's MaskDecoder.forward (multimask off) on image_embeddings = taps + [neck]."""
        decoder = self.mask_decoder
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        image_pe = self.prompt_encoder.get_dense_pe()
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
        src = neck + dense
        pos = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
        b, c, h, w = src.shape
        hs, src = decoder.transformer(src, pos, tokens)
        iou = decoder.iou_prediction_head(hs[:, 0, :])
        masks = decoder.pimm(src.transpose(1, 2).view(b, c, h, w), taps)
        return masks, iou[:, :1]
