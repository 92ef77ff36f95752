"""SegFormer all-MLP head: Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with
Transformers", NeurIPS 2021."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segjml.models.layers import ConvBNReLU


class SegFormerDecoder(nn.Module):
    """A 1x1 ConvBNReLU per stage to ``channels``, upsampled to the shallowest stage, concatenated, 1x1 fusion.

    Args:
        in_channels: channels of every encoder feature map, shallow to deep (the last four are used).
        reductions: stride of every feature map (unused; part of the common decoder signature).
        channels: width of the projections and of the fusion conv.
    """

    def __init__(self, in_channels: Sequence[int], reductions: Sequence[int], channels: int) -> None:
        super().__init__()
        self.projections = nn.ModuleList([ConvBNReLU(c, channels, 1) for c in in_channels[-4:]])
        self.fuse = ConvBNReLU(channels * len(self.projections), channels, 1)
        self.out_channels = channels

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        features = list(features)[-4:]
        size = features[0].shape[-2:]
        x = [
            F.interpolate(proj(f), size=size, mode="bilinear", align_corners=False) if f.shape[-2:] != size else proj(f)
            for proj, f in zip(self.projections, features)
        ]
        return self.fuse(torch.cat(x, dim=1))
