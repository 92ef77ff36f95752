"""Segmentation models of the paper (Table 9): timm / SMP encoders with DeepLabV3(+), PSPNet, UNet, SegFormer."""

from segjml.models.encoders import PretrainedWeightsError, build_encoder
from segjml.models.segmentation_model import (
    ARCHITECTURES,
    DECODERS,
    MODEL_INTERFACE,
    SegmentationModel,
    build_model,
    check_model_interface,
)

__all__ = [
    "ARCHITECTURES",
    "DECODERS",
    "MODEL_INTERFACE",
    "PretrainedWeightsError",
    "SegmentationModel",
    "build_encoder",
    "build_model",
    "check_model_interface",
]
