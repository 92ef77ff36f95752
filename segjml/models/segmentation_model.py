"""Encoder + decoder + main and auxiliary heads, the common frame of every model in the paper (Table 9).

:class:`SegmentationModel` is the model interface the rest of segjml relies on; :data:`DECODERS` is the table of
architectures :func:`build_model` picks from.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from segjml.models.deeplab import DeepLabV3Decoder, DeepLabV3PlusDecoder
from segjml.models.encoders import build_encoder
from segjml.models.layers import AuxHead, SegmentationHead
from segjml.models.pspnet import PSPDecoder
from segjml.models.segformer import SegFormerDecoder
from segjml.models.unet import UNetDecoder

# The architectures: name -> decoder class. Every decoder is built as ``Decoder(in_channels, reductions, channels)``
# from the encoder's ``out_channels`` and ``reductions`` and the decoder width, and exposes ``out_channels``. Adding an
# architecture is one entry here (and one test class in tests/test_models.py).
DECODERS: dict[str, type[nn.Module]] = {
    "deeplabv3": DeepLabV3Decoder,
    "deeplabv3plus": DeepLabV3PlusDecoder,
    "pspnet": PSPDecoder,
    "unet": UNetDecoder,
    "segformer": SegFormerDecoder,
}
ARCHITECTURES = tuple(DECODERS)

# The names the training code relies on (see SegmentationModel); param_groups refuses a model without them.
MODEL_INTERFACE = ("encoder", "decoder", "head", "aux_head", "num_classes", "encoder_parameters", "head_parameters")


class SegmentationModel(nn.Module):
    """``encoder -> decoder -> head`` plus an auxiliary head on the second-to-last feature map.

    ``forward`` returns ``{"out": (B, C, H, W), "aux": (B, C, H, W)}`` logits at the input size (bilinear,
    ``align_corners=False``). The auxiliary output is computed in training mode only unless ``with_aux=True``.

    This class is also segjml's model interface: :func:`segjml.engine.optim.param_groups` (hence the trainer)
    accepts a model that has

    - ``encoder``: the backbone, an ``nn.Module`` returning feature maps shallow to deep, with ``out_channels`` and
      ``reductions`` (one entry per map); it trains at the base lr;
    - ``decoder``, ``head``, ``aux_head``: modules training at ``trainer.head_lr_mult`` x lr;
    - ``num_classes``: the number of output channels of both heads;
    - ``forward(x)`` returning ``{"out": logits}`` in eval mode and ``{"out": ..., "aux": ...}`` in training mode,
      at the input size;
    - ``encoder_parameters()`` and ``head_parameters()``: the parameters of the two learning-rate groups, each
      parameter in exactly one of them, in ``model.parameters()`` order.

    Subclass it to add an architecture with another forward; :data:`MODEL_INTERFACE` lists the names checked.
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

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """The backbone's parameters (trained at the base lr)."""
        return self.encoder.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Every other parameter (decoder and heads, trained at ``head_lr_mult`` x lr), in ``parameters()`` order."""
        encoder = {id(p) for p in self.encoder_parameters()}
        return (p for p in self.parameters() if id(p) not in encoder)


def check_model_interface(model: object) -> None:
    """Raise a one-line :class:`ValueError` unless ``model`` has every name of :data:`MODEL_INTERFACE`."""
    missing = [name for name in MODEL_INTERFACE if not hasattr(model, name)]
    if missing:
        required = ", ".join(n + "()" if n.endswith("_parameters") else n for n in MODEL_INTERFACE)
        raise ValueError(
            f"model {type(model).__name__} does not follow segjml's model interface "
            f"(segjml.models.SegmentationModel): it has no {', '.join(repr(n) for n in missing)}; "
            f"subclass SegmentationModel or give it {required}"
        )


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
        arch: a name of :data:`DECODERS` (``deeplabv3``, ``deeplabv3plus``, ``pspnet``, ``unet``, ``segformer``).
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
    decoder = DECODERS[arch](enc.out_channels, enc.reductions, channels)
    return SegmentationModel(enc, decoder, num_classes, aux_channels)
