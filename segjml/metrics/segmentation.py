"""Streaming segmentation metrics: Acc, mAcc / mIoU / mDice at the data-set (D), image (I) and class (C) level,
worst-case per-image scores, ECE, boundary ECE, SCE, boundary SCE and their per-image (I) versions.

Definitions (``docs/metrics.md``, sections "Metrics and evaluation" and "Metric functions"), all reported in percent:
  - Acc: pixel accuracy over non-ignored pixels.
  - mIoU^D / mDice^D: IoU / Dice per class from the dataset-wide confusion matrix, averaged over the classes present
    in the ground truth or the prediction; mAcc^D: per-class accuracy ``tp / (tp + fn)`` averaged over the classes
    present in the ground truth.
  - ^I / ^C (Wang et al., NeurIPS 2023, and their evaluation code ``metrics/accuracy_metric.py``): Acc, IoU and Dice
    per image and class, over the classes *active* in the image: present in its (non-ignored) ground truth. Averaged
    per image then over images (I), or per class over the images where it is active then over classes (C).
  - Worst case: the mean of the per-image scores of the worst ``q`` percent of images, ``max(1, floor(q N / 100))``
    of ``N``; ``qavg`` averages ``q = 10, 20, ..., 100``.
  - ECE: top-label expected calibration error with ``n_bins`` equal-width bins,
    ``sum_b (n_b / N) |acc_b - conf_b|``. ECE^I: the same on each image alone, averaged over images.
  - SCE: static calibration error (Nixon et al. 2019), ``(1/K) sum_k sum_b (n_bk / N) |acc_bk - conf_bk|`` where
    pixels are binned by ``p_k`` and ``acc_bk`` is the share of the bin labelled ``k``. (The paper's footnote 2 says
    its first SCE code was wrong; this is the corrected definition.) SCE^I: the same on each image alone, over the
    classes in the image's ground truth, averaged over images.
  - BECE / BSCE: the same over boundary pixels (``segjml.labels.boundary_map`` with ``boundary_kernel``).

The computations are the pure functions of ``segjml.metrics.functional``; this module only keeps their sums and a
few floats per image. State: counts and sums, O(C^2 + C * n_bins), synchronised by torchmetrics with
``dist_reduce_fx="sum"``, and ``image_scores`` (5 floats per image, for the worst-case and the ^I averages),
gathered with ``dist_reduce_fx="cat"``. The per-image histograms of ECE^I / SCE^I come out of the same single
histogram calls as the data-set ones (the image is part of the index). The SCE histogram only visits the (pixel,
class) pairs with ``p_k >= 1 / n_bins`` (at most ``n_bins`` per pixel); the first bin of every class follows from
the per-class totals.

Host syncs: ``update`` reads from the device once, whatever the batch size: the input checks and the number of those
pairs come back together in one small tensor (the checks must raise in ``update``, before any state changes). All
else is tensor ops of known shapes; the data-dependent work (dropping images without a counted pixel, the means over
present classes, the worst-case sorts) is in ``compute``.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from segjml.metrics.functional import (
    accuracy_from_confusion,
    all_and_boundary,
    boundary_regions,
    calibration_histogram,
    class_calibration_histogram,
    class_mean,
    confident_mask,
    dataset_mean,
    dice_from_confusion,
    expected_calibration_error,
    image_confusion_matrices,
    image_statistics,
    iou_from_confusion,
    pixel_accuracy,
    reliability_from_histogram,
    static_calibration_error,
    top_label_and_confident_histogram,
    worst_case_mean,
)

IMAGE_COLUMNS = ("acc", "iou", "dice", "ece", "sce")
"""The per-image values kept in ``SegmentationMetrics.image_scores``, in this order."""

QAVG_LEVELS = tuple(range(10, 101, 10))
"""The ``q`` values averaged by the ``*_qavg`` metrics."""


class SegmentationMetrics(Metric):
    """All segmentation metrics of the paper in one streaming object.

    Args:
        num_classes: ``C``.
        ignore_index: label value of ignored pixels.
        n_bins: calibration bins (10 as in the official code; torchmetrics defaults to 15).
        boundary_kernel: ``k`` of the boundary region of BECE / BSCE.
        tolerance: allowed deviation of ``probs.sum(1)`` from 1.
        worst_q: ``q`` (percent of images, 1 to 100) of the worst-case keys ``acc_i_q<q>``, ``iou_i_q<q>``,
            ``dice_i_q<q>``.

    ``update(probs, target)``: ``probs`` (B, C, H, W) softmax probabilities, ``target`` (B, H, W) class ids.
    ``compute()`` returns a dict of floats in percent: ``acc``, ``macc``, ``miou``, ``mdice`` (data set),
    ``macc_i``, ``miou_i``, ``mdice_i`` (image), ``macc_c``, ``miou_c``, ``mdice_c`` (class), ``acc_i_q<q>``,
    ``iou_i_q<q>``, ``dice_i_q<q>``, ``acc_i_qavg``, ``iou_i_qavg``, ``dice_i_qavg`` (worst case), ``ece``, ``bece``,
    ``sce``, ``bsce``, ``ece_i``, ``sce_i`` (calibration); plus ``iou_per_class`` (list, percent, NaN where a class
    never occurs).

    Direction: higher is better for the accuracy, IoU and Dice keys and ``iou_per_class``; lower is better for the
    calibration errors (``ece``, ``bece``, ``sce``, ``bsce``, ``ece_i``, ``sce_i``). ``higher_is_better`` is
    therefore ``None`` (mixed).

    State: ``confmat`` (C, C) long; ``class_score_sum`` (3, C) float64 (Acc, IoU, Dice summed over the images where
    the class is active) and ``class_image_count`` (C,) long; ``top_hist`` (2, n_bins, 3) and ``class_hist`` (2, C,
    n_bins, 3) float64, first index ``[all non-ignored pixels, boundary pixels]``: all summed across processes.
    ``image_scores``: list of flat float64 tensors, 5 values per image (``IMAGE_COLUMNS``: its mean Acc, IoU, Dice
    over its active classes, its ECE and SCE; NaN for an image without a counted pixel, left out by ``compute``),
    concatenated across processes.

    Under DDP, ``compute()`` sums / gathers the states over the processes and torchmetrics then restores each
    process's own; ``reliability()`` reads the summed histogram that the last ``compute()`` used.
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
        worst_q: int = 10,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(worst_q, bool) or not isinstance(worst_q, int) or not 1 <= worst_q <= 100:
            raise ValueError(f"worst_q must be an integer percentage in [1, 100], got {worst_q!r}")
        self.num_classes, self.ignore_index, self.n_bins = num_classes, ignore_index, n_bins
        self.boundary_kernel, self.tolerance, self.worst_q = boundary_kernel, tolerance, worst_q
        c = num_classes
        self.add_state("confmat", torch.zeros(c, c, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("class_score_sum", torch.zeros(3, c, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("class_image_count", torch.zeros(c, dtype=torch.long), dist_reduce_fx="sum")
        # top-label calibration: [region (all, boundary), bin, (count, sum conf, sum correct)]
        self.add_state("top_hist", torch.zeros(2, n_bins, 3, dtype=torch.float64), dist_reduce_fx="sum")
        # static calibration: [region, class, bin, (count, sum p_k, count label == k)]
        self.add_state("class_hist", torch.zeros(2, c, n_bins, 3, dtype=torch.float64), dist_reduce_fx="sum")
        # per image: the IMAGE_COLUMNS (NaN without a counted pixel), flattened (one float64 tensor per update)
        self.add_state("image_scores", [], dist_reduce_fx="cat")
        self._seed_image_scores()
        # top_hist as the last compute() saw it (summed over the processes), and the update count it belongs to
        self._computed_top_hist: tuple[int, torch.Tensor] | None = None

    def _seed_image_scores(self) -> None:
        # A process without any update would otherwise send torchmetrics' empty placeholder of the default float
        # dtype to the gather, unlike the float64 scores of the other processes.
        self.image_scores.append(torch.zeros(0, dtype=torch.float64, device=self.confmat.device))

    def reset(self) -> None:
        super().reset()
        self._seed_image_scores()

    def _check_shapes(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        if probs.ndim != 4 or probs.shape[1] != self.num_classes:
            raise ValueError(f"probs must be (B, {self.num_classes}, H, W), got {tuple(probs.shape)}")
        if tuple(target.shape) != (probs.shape[0], *probs.shape[2:]):
            raise ValueError(f"target shape {tuple(target.shape)} does not match probs {tuple(probs.shape)}")
        if target.is_floating_point():
            raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")

    def _check_values(self, probs: torch.Tensor, target: torch.Tensor, num_pairs: torch.Tensor) -> int:
        """Raise on bad labels or probabilities; return ``num_pairs`` as an int. The update's one host read."""
        valid = target != self.ignore_index
        bad = (valid & ((target < 0) | (target >= self.num_classes))).reshape(-1)
        first_bad = target.reshape(-1).gather(0, bad.int().argmax().view(1))[0]
        b, c = probs.shape[:2]
        # per-pixel sums as one batched matrix product (much faster than a strided reduction over dim 1)
        total = torch.bmm(probs.new_ones(b, 1, c), probs.reshape(b, c, -1))
        values = [bad.any(), first_bad, probs.amin(), (total - 1).abs().amax(), num_pairs]
        any_bad, bad_id, low, deviation, pairs = torch.stack([v.double() for v in values]).tolist()
        if any_bad:
            raise ValueError(
                f"target holds class id {int(bad_id)} outside [0, {self.num_classes}) "
                f"that is not ignore_index={self.ignore_index}"
            )
        if not (low >= 0 and deviation <= self.tolerance):  # NaN fails too
            raise ValueError(
                "probs are not a distribution over classes (negative, or not summing to 1 over dim 1): "
                "pass softmax(logits, dim=1)"
            )
        return int(pairs)

    @torch.no_grad()
    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        self._check_shapes(probs, target)
        probs = probs.float().contiguous()
        c, nb = self.num_classes, self.n_bins
        conf = probs.amax(1)
        mask = confident_mask(probs, conf, nb)
        num_pairs = self._check_values(probs, target, torch.count_nonzero(mask))
        valid = target != self.ignore_index
        # 0 interior, 1 boundary, 2 ignored: histograms keep groups 0 and 1 and drop the ignored pixels
        region = boundary_regions(target, self.boundary_kernel, self.ignore_index)
        pred, *confident = top_label_and_confident_histogram(
            probs, conf, nb, region, num_groups=2, per_image=True, mask=mask, num_pairs=num_pairs
        )

        image_confmats = image_confusion_matrices(pred, target, c, valid)
        self.confmat += image_confmats.sum(0)
        stats = image_statistics(image_confmats)
        self.class_score_sum += stats.class_score_sum
        self.class_image_count += stats.class_image_count

        # per-image histograms (B, region, ...): summed over images for the data-set metrics, over regions for ^I
        correct = pred.view_as(target) == target
        top = calibration_histogram(conf, correct, nb, region, num_groups=2, per_image=True)
        self.top_hist += all_and_boundary(top.sum(0))
        cls = class_calibration_histogram(probs, target, nb, region, num_groups=2, confident=confident, per_image=True)
        self.class_hist += all_and_boundary(cls.sum(0))
        ece = expected_calibration_error(top.sum(1))
        sce = static_calibration_error(cls.sum(1), classes=stats.active)
        scores = torch.cat([stats.scores, ece[:, None], sce[:, None]], dim=1)
        # an image without a counted pixel: a NaN row, left out by compute() (not here: boolean indexing syncs)
        self.image_scores.append(torch.where(stats.kept[:, None], scores, torch.nan).reshape(-1))

    def compute(self) -> dict:
        # torchmetrics syncs the states for compute() and restores this process's own afterwards: keep the synced
        # histogram for reliability()
        self._computed_top_hist = (self.update_count, self.top_hist.clone())
        iou = iou_from_confusion(self.confmat)
        images = dim_zero_cat(self.image_scores).view(-1, len(IMAGE_COLUMNS))
        images = images[~images[:, 0].isnan()]  # images without a counted pixel
        if images.shape[0]:
            image_mean = images.mean(0)
        else:
            image_mean = images.new_zeros(len(IMAGE_COLUMNS))
        class_level = class_mean(self.class_score_sum, self.class_image_count)
        worst = worst_case_mean(images[:, :3], self.worst_q)
        worst_avg = torch.stack([worst_case_mean(images[:, :3], q) for q in QAVG_LEVELS]).mean(0)
        q = self.worst_q
        return {
            "acc": _pct(pixel_accuracy(self.confmat)),
            "macc": _pct(dataset_mean(accuracy_from_confusion(self.confmat))),
            "miou": _pct(dataset_mean(iou)),
            "mdice": _pct(dataset_mean(dice_from_confusion(self.confmat))),
            "macc_i": _pct(image_mean[0]),
            "miou_i": _pct(image_mean[1]),
            "mdice_i": _pct(image_mean[2]),
            "macc_c": _pct(class_level[0]),
            "miou_c": _pct(class_level[1]),
            "mdice_c": _pct(class_level[2]),
            f"acc_i_q{q}": _pct(worst[0]),
            f"iou_i_q{q}": _pct(worst[1]),
            f"dice_i_q{q}": _pct(worst[2]),
            "acc_i_qavg": _pct(worst_avg[0]),
            "iou_i_qavg": _pct(worst_avg[1]),
            "dice_i_qavg": _pct(worst_avg[2]),
            "ece": _pct(expected_calibration_error(self.top_hist[0])),
            "bece": _pct(expected_calibration_error(self.top_hist[1])),
            "sce": _pct(static_calibration_error(self.class_hist[0])),
            "bsce": _pct(static_calibration_error(self.class_hist[1])),
            "ece_i": _pct(image_mean[3]),
            "sce_i": _pct(image_mean[4]),
            "iou_per_class": [float(v) * 100 for v in iou.tolist()],
        }

    def reliability(self, boundary: bool = False) -> dict[str, torch.Tensor]:
        """Per-bin ``count``, mean ``confidence`` and ``accuracy`` of the top-label histogram (for diagrams).

        The histogram of the last ``compute()``: under DDP, summed over all processes (no collective call here, so
        one process alone may ask). Without a ``compute()`` since the last update: this process's own histogram."""
        count, hist = self._computed_top_hist or (None, None)
        hist = hist if count == self.update_count else self.top_hist
        return reliability_from_histogram(hist[int(boundary)])


def _pct(value: torch.Tensor) -> float:
    return float(value) * 100.0
