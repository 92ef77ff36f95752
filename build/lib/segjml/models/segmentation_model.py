"""Encoder + decoder + main and auxiliary heads, the common frame of every model in the paper (Table 9)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segjml.models.deeplab import DeepLabV3Decoder, DeepLabV3PlusDecoder
from segjml.models.encoders import build_encoder
from segjml.models.layers import AuxHead, SegmentationHead
from segjml.models.pspnet import PSPDecoder
from segjml.models.segformer import SegFormerDecoder
from segjml.models.unet import UNetDecoder

ARCHITECTURES = ("deeplabv3", "deeplabv3plus", "pspnet", "unet", "segformer")


class SegmentationModel(nn.Module):
    """``encoder -> decoder -> head`` plus an auxiliary head on the second-to-last feature map.

    ``forward`` returns ``{"out": (B, C, H, W), "aux": (B, C, H, W)}`` logits at the input size (bilinear,
    ``align_corners=False``). The auxiliary output is computed in training mode only unless ``with_aux=True``.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, num_classes: int, aux_channels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = SegmentationHead(decoder.out_channels, num_classes)
        self.aux_head = AuxHead(encoder.out_channels[-2], aux_channels, num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor, with_aux: bool | None = None) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        features = self.encoder(x)
        out = {"out": _resize(self.head(self.decoder(features)), size)}
        if self.training if with_aux is None else with_aux:
            out["aux"] = _resize(self.aux_head(features[-2]), size)
        return out


def _resize(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def build_model(
    arch: str,
    encoder: str,
    num_classes: int,
    channels: int,
    aux_channels: int,
    output_stride: int = 8,
    pretrained: bool = False,
    pretrained_path: str | None = None,
) -> SegmentationModel:
    """Build one of the paper's models from plain values (the ``configs/model`` presets call this).

    Args:
        arch: one of ``deeplabv3``, ``deeplabv3plus``, ``pspnet``, ``unet``, ``segformer``.
        encoder: a timm model name (``resnet18d``, ``mobilenetv2_100``, ...) or an SMP MiT name (``mit_b0``).
        num_classes: output classes.
        channels: decoder width ("head ch" of Table 9; the UNet base width).
        aux_channels: width of the auxiliary head's 3x3 conv.
        output_stride: 8, 16 or 32 (dilated timm backbones).
        pretrained: ImageNet weights for the encoder, from the offline cache or ``pretrained_path``.
        pretrained_path: explicit encoder weights file.

    Raises:
        ValueError: an unknown ``arch`` (checked before the encoder is built) or encoder name, one line each.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model.arch '{arch}'; choose one of {', '.join(ARCHITECTURES)}")
    enc = build_encoder(encoder, output_stride=output_stride, pretrained=pretrained, pretrained_path=pretrained_path)
    in_ch, red = enc.out_channels, enc.reductions
    if arch == "deeplabv3":
        dec = DeepLabV3Decoder(in_ch, channels)
    elif arch == "deeplabv3plus":
        dec = DeepLabV3PlusDecoder(in_ch, red, channels)
    elif arch == "pspnet":
        dec = PSPDecoder(in_ch, channels)
    elif arch == "unet":
        dec = UNetDecoder(in_ch, red, channels)
    else:  # segformer
        dec = SegFormerDecoder(in_ch, channels)
    return SegmentationModel(enc, dec, num_classes, aux_channels)
