"""Segmentation and calibration metrics (Acc, mIoU^D/I/C, ECE, BECE, SCE, BSCE)."""

from segjml.metrics.segmentation import SegmentationMetrics

__all__ = ["SegmentationMetrics"]
