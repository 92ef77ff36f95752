"""Segmentation and calibration metrics (Acc, mIoU^D/I/C, ECE, BECE, SCE, BSCE).

``SegmentationMetrics`` is the streaming ``torchmetrics.Metric``; ``segjml.metrics.functional`` holds the pure tensor
functions it is built from (definitions in ``docs/metrics.md``).
"""

from segjml.metrics import functional
from segjml.metrics.functional import (
    all_and_boundary,
    boundary_regions,
    calibration_histogram,
    class_calibration_histogram,
    class_mean_iou,
    confusion_matrix,
    expected_calibration_error,
    image_confusion_matrices,
    image_iou_statistics,
    image_mean_iou,
    iou_from_confusion,
    mean_iou,
    pixel_accuracy,
    static_calibration_error,
)
from segjml.metrics.segmentation import SegmentationMetrics

__all__ = [
    "SegmentationMetrics",
    "all_and_boundary",
    "boundary_regions",
    "calibration_histogram",
    "class_calibration_histogram",
    "class_mean_iou",
    "confusion_matrix",
    "expected_calibration_error",
    "functional",
    "image_confusion_matrices",
    "image_iou_statistics",
    "image_mean_iou",
    "iou_from_confusion",
    "mean_iou",
    "pixel_accuracy",
    "static_calibration_error",
]
