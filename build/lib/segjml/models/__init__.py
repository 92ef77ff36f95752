"""Segmentation models of the paper (Table 9): timm / SMP encoders with DeepLabV3(+), PSPNet, UNet, SegFormer."""

from segjml.models.encoders import PretrainedWeightsError, build_encoder
from segjml.models.segmentation_model import ARCHITECTURES, SegmentationModel, build_model

__all__ = ["ARCHITECTURES", "PretrainedWeightsError", "SegmentationModel", "build_encoder", "build_model"]
