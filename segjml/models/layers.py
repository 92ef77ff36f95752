"""Building blocks shared by the decoders: ConvBNReLU, depthwise-separable conv, the segmentation heads."""

from __future__ import annotations

import torch
from torch import nn


class ConvBNReLU(nn.Sequential):
    """``Conv2d`` (no bias) -> ``BatchNorm2d`` -> ``ReLU``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, dilation: int = 1) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class SeparableConvBNReLU(nn.Sequential):
    """Depthwise ``k x k`` conv -> pointwise ``1 x 1`` conv -> ``BatchNorm2d`` -> ``ReLU`` (DeepLabV3+ style)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, dilation: int = 1) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, in_ch, kernel_size, padding=padding, dilation=dilation, groups=in_ch, bias=False),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class SegmentationHead(nn.Sequential):
    """Main head: ``Dropout2d(0.1) -> Conv1x1(num_classes)``."""

    def __init__(self, in_ch: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__(nn.Dropout2d(dropout), nn.Conv2d(in_ch, num_classes, 1))


class AuxHead(nn.Sequential):
    """Auxiliary head: ``ConvBNReLU3x3(in_ch -> aux_ch) -> Dropout2d(0.1) -> Conv1x1(num_classes)``."""

    def __init__(self, in_ch: int, aux_ch: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__(ConvBNReLU(in_ch, aux_ch, 3), nn.Dropout2d(dropout), nn.Conv2d(aux_ch, num_classes, 1))


class ImagePool(nn.Module):
    """Global average pool -> ``ConvBNReLU1x1`` -> broadcast back to the input size."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = ConvBNReLU(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.conv(self.pool(x)).expand(-1, -1, *x.shape[-2:])
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # a broadcast view has no memory format: materialise it as channels_last, or the ASPP concatenation of
            # the branches (and every layer after it) falls back to NCHW
            return pooled.contiguous(memory_format=torch.channels_last)
        return pooled
