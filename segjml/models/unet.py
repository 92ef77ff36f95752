"""UNet decoder: Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image Segmentation", 2015."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segjml.models.layers import ConvBNReLU


class UNetBlock(nn.Sequential):
    """Two 3x3 ConvBNReLU."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(ConvBNReLU(in_ch, out_ch, 3), ConvBNReLU(out_ch, out_ch, 3))


class UNetDecoder(nn.Module):
    """Five x2 upsampling blocks of widths ``16, 8, 4, 2, 1 x channels``, each concatenating the skip of its stride.

    The deepest map (stride 32) is upsampled five times back to stride 1; a block whose stride has no encoder map
    (stride 1) takes no skip.

    Args:
        in_channels: channels of every encoder feature map, shallow to deep.
        reductions: stride of every feature map; they place the skips.
        channels: base width (the last block's width).
    """

    def __init__(self, in_channels: Sequence[int], reductions: Sequence[int], channels: int) -> None:
        super().__init__()
        self.skip_index = {r: i for i, r in enumerate(reductions)}
        widths = [channels * m for m in (16, 8, 4, 2, 1)]
        deepest = reductions[-1]
        self.strides = [deepest // 2 ** (i + 1) for i in range(len(widths))]
        blocks, prev = [], in_channels[-1]
        for width, stride in zip(widths, self.strides):
            skip_ch = in_channels[self.skip_index[stride]] if stride in self.skip_index else 0
            blocks.append(UNetBlock(prev + skip_ch, width))
            prev = width
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = prev

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for block, stride in zip(self.blocks, self.strides):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            if stride in self.skip_index:
                skip = features[self.skip_index[stride]]
                if x.shape[-2:] != skip.shape[-2:]:
                    x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
                x = torch.cat([x, skip], dim=1)
            x = block(x)
        return x
