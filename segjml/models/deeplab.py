"""DeepLabV3 and DeepLabV3+ decoders.

DeepLabV3: Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation", 2017.
DeepLabV3+: Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation",
ECCV 2018. Layouts follow the JML paper's Table 9.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segjml.models.layers import ConvBNReLU, ImagePool, SeparableConvBNReLU


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three atrous 3x3 and an image-pool branch, concatenated.

    Args:
        in_ch: channels of the deepest feature map.
        out_ch: channels of each branch; the output has ``5 * out_ch`` channels.
        rates: dilation rates of the three 3x3 branches.
        separable: use depthwise-separable 3x3 branches (DeepLabV3+).
    """

    def __init__(self, in_ch: int, out_ch: int, rates: Sequence[int] = (12, 24, 36), separable: bool = False) -> None:
        super().__init__()
        conv3 = SeparableConvBNReLU if separable else ConvBNReLU
        self.branches = nn.ModuleList(
            [ConvBNReLU(in_ch, out_ch, 1)]
            + [conv3(in_ch, out_ch, 3, dilation=r) for r in rates]
            + [ImagePool(in_ch, out_ch)]
        )
        self.out_channels = out_ch * len(self.branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class DeepLabV3Decoder(nn.Module):
    """ASPP on the deepest feature map, then a 3x3 ConvBNReLU bottleneck to ``channels``.

    Args:
        in_channels: channels of every encoder feature map, shallow to deep (only the deepest is used).
        reductions: stride of every feature map (unused; part of the common decoder signature).
        channels: width of the ASPP branches and the bottleneck.
        rates: dilation rates of the three atrous 3x3 branches.
    """

    def __init__(
        self, in_channels: Sequence[int], reductions: Sequence[int], channels: int, rates: Sequence[int] = (12, 24, 36)
    ) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels[-1], channels, rates)
        self.bottleneck = ConvBNReLU(self.aspp.out_channels, channels, 3)
        self.out_channels = channels

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.bottleneck(self.aspp(features[-1]))


class DeepLabV3PlusDecoder(nn.Module):
    """Separable ASPP + 3x3 bottleneck, fused with a 48-channel stride-4 shortcut by two separable 3x3 convs.

    Args:
        in_channels: channels of every encoder feature map, shallow to deep.
        reductions: stride of every feature map; the shortcut is the first map at stride 4.
        channels: width of the ASPP branches, the bottleneck and the fusion convs.
        rates: dilation rates of the three separable atrous 3x3 branches.
        shortcut_channels: width of the stride-4 projection.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        reductions: Sequence[int],
        channels: int,
        rates: Sequence[int] = (12, 24, 36),
        shortcut_channels: int = 48,
    ) -> None:
        super().__init__()
        if 4 not in reductions:
            raise ValueError(f"DeepLabV3+ needs a stride-4 feature map; the encoder gives strides {list(reductions)}")
        self.shortcut_index = list(reductions).index(4)
        self.aspp = ASPP(in_channels[-1], channels, rates, separable=True)
        self.bottleneck = ConvBNReLU(self.aspp.out_channels, channels, 3)
        self.shortcut = ConvBNReLU(in_channels[self.shortcut_index], shortcut_channels, 1)
        self.fuse = nn.Sequential(
            SeparableConvBNReLU(channels + shortcut_channels, channels, 3),
            SeparableConvBNReLU(channels, channels, 3),
        )
        self.out_channels = channels

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.bottleneck(self.aspp(features[-1]))
        skip = self.shortcut(features[self.shortcut_index])
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x, skip], dim=1))
