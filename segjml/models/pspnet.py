"""PSPNet decoder: Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segjml.models.layers import ConvBNReLU


class PSPDecoder(nn.Module):
    """Pyramid pooling (bins 1, 2, 3, 6; a 1x1 ConvBNReLU each) concatenated with the input, 3x3 bottleneck.

    Args:
        in_channels: channels of every encoder feature map, shallow to deep (only the deepest is used).
        reductions: stride of every feature map (unused; part of the common decoder signature).
        channels: width of every pooling branch and of the bottleneck.
        bins: output sizes of the adaptive average pools.
    """

    def __init__(
        self, in_channels: Sequence[int], reductions: Sequence[int], channels: int, bins: Sequence[int] = (1, 2, 3, 6)
    ) -> None:
        super().__init__()
        in_ch = in_channels[-1]
        self.bins = tuple(bins)
        self.stages = nn.ModuleList([ConvBNReLU(in_ch, channels, 1) for _ in self.bins])
        self.bottleneck = ConvBNReLU(in_ch + channels * len(self.bins), channels, 3)
        self.out_channels = channels

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        size = x.shape[-2:]
        pooled = [
            F.interpolate(stage(F.adaptive_avg_pool2d(x, b)), size=size, mode="bilinear", align_corners=False)
            for b, stage in zip(self.bins, self.stages)
        ]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))
