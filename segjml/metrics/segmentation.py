"""Streaming segmentation metrics: Acc, mIoU^D / mIoU^I / mIoU^C, ECE, boundary ECE, SCE, boundary SCE.

Definitions (``docs/metrics.md``, sections "Metrics and evaluation" and "Metric functions"), all reported in percent:
  - Acc: pixel accuracy over non-ignored pixels.
  - mIoU^D: IoU per class from the dataset-wide confusion matrix, averaged over classes present in the ground
    truth or the prediction.
  - mIoU^I / mIoU^C (Wang et al., NeurIPS 2023): IoU per image and class, over the classes that occur in the image
    (in its ground truth or prediction); averaged per image then over images (I), or per class over the images
    where it occurs then over classes (C).
  - ECE: top-label expected calibration error with ``n_bins`` equal-width bins,
    ``sum_b (n_b / N) |acc_b - conf_b|``.
  - SCE: static calibration error (Nixon et al. 2019), ``(1/K) sum_k sum_b (n_bk / N) |acc_bk - conf_bk|`` where
    pixels are binned by ``p_k`` and ``acc_bk`` is the share of the bin labelled ``k``. (The paper's footnote 2 says
    its first SCE code was wrong; this is the corrected definition.)
  - BECE / BSCE: the same over boundary pixels (``segjml.labels.boundary_map`` with ``boundary_kernel``).

The computations are the pure functions of ``segjml.metrics.functional``; this module only keeps their sums.
All state is counts and sums, O(C^2 + C * n_bins), synchronised by torchmetrics with ``dist_reduce_fx="sum"``.
The SCE histogram only visits the (pixel, class) pairs with ``p_k >= 1 / n_bins`` (at most ``n_bins`` per pixel); the
first bin of every class follows from the per-class totals.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from segjml.metrics.functional import (
    all_and_boundary,
    boundary_regions,
    calibration_histogram,
    class_calibration_histogram,
    class_mean_iou,
    expected_calibration_error,
    image_confusion_matrices,
    image_iou_statistics,
    image_mean_iou,
    iou_from_confusion,
    mean_iou,
    pixel_accuracy,
    reliability_from_histogram,
    static_calibration_error,
    top_label_and_confident_histogram,
)


class SegmentationMetrics(Metric):
    """All segmentation metrics of the paper in one streaming object.

    Args:
        num_classes: ``C``.
        ignore_index: label value of ignored pixels.
        n_bins: calibration bins (10 as in the official code; torchmetrics defaults to 15).
        boundary_kernel: ``k`` of the boundary region of BECE / BSCE.
        tolerance: allowed deviation of ``probs.sum(1)`` from 1.

    ``update(probs, target)``: ``probs`` (B, C, H, W) softmax probabilities, ``target`` (B, H, W) class ids.
    ``compute()`` returns a dict of floats in percent plus ``iou_per_class`` (list, percent, NaN where a class
    never occurs).

    Direction: higher is better for ``acc``, ``miou``, ``miou_i``, ``miou_c`` and ``iou_per_class``; lower is better
    for ``ece``, ``bece``, ``sce`` and ``bsce``. ``higher_is_better`` is therefore ``None`` (mixed).

    State (summed across processes): ``confmat`` (C, C) long; ``image_iou_sum`` () float64, ``image_count`` () long,
    ``class_iou_sum`` (C,) float64, ``class_image_count`` (C,) long; ``top_hist`` (2, n_bins, 3) and ``class_hist``
    (2, C, n_bins, 3) float64, first index ``[all non-ignored pixels, boundary pixels]``.
    """

    full_state_update = False
    higher_is_better = None  # mixed: see the class docstring

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        n_bins: int = 10,
        boundary_kernel: int = 3,
        tolerance: float = 1e-3,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.ignore_index, self.n_bins = num_classes, ignore_index, n_bins
        self.boundary_kernel, self.tolerance = boundary_kernel, tolerance
        c = num_classes
        self.add_state("confmat", torch.zeros(c, c, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("image_iou_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("image_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("class_iou_sum", torch.zeros(c, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("class_image_count", torch.zeros(c, dtype=torch.long), dist_reduce_fx="sum")
        # top-label calibration: [region (all, boundary), bin, (count, sum conf, sum correct)]
        self.add_state("top_hist", torch.zeros(2, n_bins, 3, dtype=torch.float64), dist_reduce_fx="sum")
        # static calibration: [region, class, bin, (count, sum p_k, count label == k)]
        self.add_state("class_hist", torch.zeros(2, c, n_bins, 3, dtype=torch.float64), dist_reduce_fx="sum")

    def _check(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        if probs.ndim != 4 or probs.shape[1] != self.num_classes:
            raise ValueError(f"probs must be (B, {self.num_classes}, H, W), got {tuple(probs.shape)}")
        if tuple(target.shape) != (probs.shape[0], *probs.shape[2:]):
            raise ValueError(f"target shape {tuple(target.shape)} does not match probs {tuple(probs.shape)}")
        if target.is_floating_point():
            raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")
        valid = target != self.ignore_index
        bad = valid & ((target < 0) | (target >= self.num_classes))
        if bad.any():
            raise ValueError(
                f"target holds class id {int(target[bad][0])} outside [0, {self.num_classes}) "
                f"that is not ignore_index={self.ignore_index}"
            )
        b, c = probs.shape[:2]
        # per-pixel sums as one batched matrix product (much faster than a strided reduction over dim 1)
        total = torch.bmm(probs.new_ones(b, 1, c), probs.reshape(b, c, -1))
        if probs.amin() < 0 or (total - 1).abs().amax() > self.tolerance:
            raise ValueError(
                "probs are not a distribution over classes (negative, or not summing to 1 over dim 1): "
                "pass softmax(logits, dim=1)"
            )

    @torch.no_grad()
    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        self._check(probs, target)
        probs = probs.float().contiguous()
        c, nb = self.num_classes, self.n_bins
        valid = target != self.ignore_index
        # 0 interior, 1 boundary, 2 ignored: histograms keep groups 0 and 1 and drop the ignored pixels
        region = boundary_regions(target, self.boundary_kernel, self.ignore_index)
        conf = probs.amax(1)
        pred, *confident = top_label_and_confident_histogram(probs, conf, nb, region, num_groups=2)

        image_confmats = image_confusion_matrices(pred, target, c, valid)
        self.confmat += image_confmats.sum(0)
        stats = image_iou_statistics(image_confmats)
        self.image_iou_sum += stats.image_iou_sum
        self.image_count += stats.image_count
        self.class_iou_sum += stats.class_iou_sum
        self.class_image_count += stats.class_image_count

        correct = pred.view_as(target) == target
        self.top_hist += all_and_boundary(calibration_histogram(conf, correct, nb, region, num_groups=2))
        class_hist = class_calibration_histogram(probs, target, nb, region, num_groups=2, confident=confident)
        self.class_hist += all_and_boundary(class_hist)

    def compute(self) -> dict:
        iou = iou_from_confusion(self.confmat)
        return {
            "acc": _pct(pixel_accuracy(self.confmat)),
            "miou": _pct(mean_iou(iou)),
            "miou_i": _pct(image_mean_iou(self.image_iou_sum, self.image_count)),
            "miou_c": _pct(class_mean_iou(self.class_iou_sum, self.class_image_count)),
            "ece": _pct(expected_calibration_error(self.top_hist[0])),
            "bece": _pct(expected_calibration_error(self.top_hist[1])),
            "sce": _pct(static_calibration_error(self.class_hist[0])),
            "bsce": _pct(static_calibration_error(self.class_hist[1])),
            "iou_per_class": [float(v) * 100 for v in iou.tolist()],
        }

    def reliability(self, boundary: bool = False) -> dict[str, torch.Tensor]:
        """Per-bin ``count``, mean ``confidence`` and ``accuracy`` of the top-label histogram (for diagrams)."""
        return reliability_from_histogram(self.top_hist[int(boundary)])


def _pct(value: torch.Tensor) -> float:
    return float(value) * 100.0
