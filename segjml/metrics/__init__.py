"""Segmentation and calibration metrics (Acc, mAcc / mIoU / mDice at D / I / C level, worst-case per-image scores,
ECE, BECE, SCE, BSCE, ECE^I, SCE^I).

``SegmentationMetrics`` is the streaming ``torchmetrics.Metric``; ``segjml.metrics.functional`` holds the pure tensor
functions it is built from (definitions in ``docs/metrics.md``).
"""

from segjml.metrics import functional
from segjml.metrics.functional import (
    accuracy_from_confusion,
    all_and_boundary,
    boundary_regions,
    calibration_histogram,
    class_calibration_histogram,
    class_mean,
    confusion_matrix,
    dataset_mean,
    dice_from_confusion,
    expected_calibration_error,
    image_confusion_matrices,
    image_statistics,
    iou_from_confusion,
    pixel_accuracy,
    static_calibration_error,
    worst_case_mean,
)
from segjml.metrics.segmentation import SegmentationMetrics

__all__ = [
    "SegmentationMetrics",
    "accuracy_from_confusion",
    "all_and_boundary",
    "boundary_regions",
    "calibration_histogram",
    "class_calibration_histogram",
    "class_mean",
    "confusion_matrix",
    "dataset_mean",
    "dice_from_confusion",
    "expected_calibration_error",
    "functional",
    "image_confusion_matrices",
    "image_statistics",
    "iou_from_confusion",
    "pixel_accuracy",
    "static_calibration_error",
    "worst_case_mean",
]
