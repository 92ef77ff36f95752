"""Pure tensor functions behind ``SegmentationMetrics``: confusion matrices, Acc / IoU / Dice per data set, image and
class, worst-case means, calibration histograms, errors.

Definitions and the layout of every histogram are in ``docs/metrics.md`` (section "Metric functions"). Shapes use
``B`` images, ``C`` classes, ``N`` pixels per image (any trailing spatial shape is flattened) and ``G`` groups.

Groups. The histogram functions take an optional integer ``group`` per pixel and return one histogram per group
``0 .. num_groups - 1`` (leading dimension ``G``); pixels whose group is ``num_groups`` or more are not counted, and
without ``group`` every pixel is counted and the leading dimension is left out. ``SegmentationMetrics`` groups pixels
by ``boundary_regions`` (interior, boundary, ignored) and sums the groups with ``all_and_boundary``. With
``per_image=True`` they return one histogram per image (a further leading ``B`` dimension) from the same single
histogram call (the image is part of the index).

Everything runs on the device of its inputs; there is no Python loop over pixels or classes (only over images, in the
per-class totals of the SCE histogram). No host syncs: a histogram is an ``index_add_`` into a fixed number of slots
(``_bincount``; ``torch.bincount`` reads its input's minimum and maximum back to the host on CUDA), and uncounted
entries go to spare slots instead of being dropped by boolean indexing. The one data-dependent size, the number of
confident ``(pixel, class)`` pairs, is an argument (``num_pairs``) that the caller reads back together with whatever
else it needs from the device (``SegmentationMetrics`` does, with its input checks); without it, ``nonzero`` reads it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from segjml.labels.boundary import boundary_map

INTERIOR, BOUNDARY, IGNORED = 0, 1, 2
"""Region ids returned by ``boundary_regions``."""


# --------------------------------------------------------------------------------------------------------------------
# Confusion matrices and IoU


def _bincount(idx: torch.Tensor, size: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.bincount(idx, weights, minlength=size)`` for ``idx`` in ``[0, size)``, without its host syncs: an
    ``index_add_`` into ``size`` slots. Long counts, or float64 sums of ``weights``; summed in the order of ``idx``."""
    if weights is None:
        out, weights = torch.zeros(size, dtype=torch.long, device=idx.device), idx.new_ones((), dtype=torch.long)
    else:
        out, weights = torch.zeros(size, dtype=torch.float64, device=idx.device), weights.reshape(-1).double()
    return out.index_add_(0, idx.reshape(-1), weights.expand(idx.numel()))


def image_confusion_matrices(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """One confusion matrix per image, by a single histogram (``_bincount``).

    Args:
        pred: ``(B, ...)`` predicted class ids in ``[0, C)``.
        target: ``(B, ...)`` ground-truth class ids, in ``[0, C)`` wherever ``valid``.
        num_classes: ``C``.
        valid: ``(B, ...)`` bool, pixels to count; ``None`` counts all. Values of ``target`` / ``pred`` outside
            ``valid`` are never used as indices (they may hold an ignore label).

    Returns:
        ``(B, C, C)`` long, ``[b, i, j]`` = pixels of image ``b`` with ground truth ``i`` predicted as ``j``.
    """
    b, c = target.shape[0], num_classes
    dtype = torch.int32 if b * c * c < 2**31 - 1 else torch.long
    pred, target = pred.reshape(b, -1).to(dtype), target.reshape(b, -1).to(dtype)
    offset = torch.arange(b, device=target.device, dtype=dtype).view(b, 1) * (c * c)
    idx = (target * c + pred).add_(offset)
    if valid is not None:  # uncounted pixels go to a spare slot after the last matrix
        idx = torch.where(valid.reshape(b, -1), idx, b * c * c)
    return _bincount(idx, b * c * c + 1)[: b * c * c].view(b, c, c)


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """``(C, C)`` long confusion matrix (rows ground truth, columns prediction) of tensors of any equal shape.

    Arguments as in ``image_confusion_matrices``, without the image dimension.
    """
    valid = None if valid is None else valid.reshape(1, -1)
    return image_confusion_matrices(pred.reshape(1, -1), target.reshape(1, -1), num_classes, valid)[0]


def iou_from_confusion(confmat: torch.Tensor) -> torch.Tensor:
    """Per-class IoU ``tp / (tp + fp + fn) = |gt & pred| / |gt | pred|`` of ``(..., C, C)`` confusion matrices.

    Returns:
        ``(..., C)`` float64 in ``[0, 1]``; NaN for a class absent from both ground truth and prediction.
    """
    cm = confmat.double()
    inter = cm.diagonal(dim1=-2, dim2=-1)
    union = cm.sum(-2) + cm.sum(-1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))


def accuracy_from_confusion(confmat: torch.Tensor) -> torch.Tensor:
    """Per-class accuracy (recall) ``tp / (tp + fn) = |gt & pred| / |gt|`` of ``(..., C, C)`` confusion matrices.

    Returns:
        ``(..., C)`` float64 in ``[0, 1]``; NaN for a class absent from the ground truth.
    """
    cm = confmat.double()
    gt = cm.sum(-1)
    return torch.where(gt > 0, cm.diagonal(dim1=-2, dim2=-1) / gt.clamp_min(1), torch.full_like(gt, float("nan")))


def dice_from_confusion(confmat: torch.Tensor) -> torch.Tensor:
    """Per-class Dice ``2 tp / (2 tp + fp + fn) = 2 |gt & pred| / (|gt| + |pred|)`` of ``(..., C, C)`` confusion
    matrices.

    Returns:
        ``(..., C)`` float64 in ``[0, 1]``; NaN for a class absent from both ground truth and prediction.
    """
    cm = confmat.double()
    total = cm.sum(-2) + cm.sum(-1)
    inter = cm.diagonal(dim1=-2, dim2=-1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.full_like(total, float("nan")))


def pixel_accuracy(confmat: torch.Tensor) -> torch.Tensor:
    """Share of counted pixels predicted right, from a ``(C, C)`` confusion matrix: float64 scalar (0 if empty)."""
    cm = confmat.double()
    total = cm.sum()
    return cm.diagonal().sum() / total if total > 0 else total * 0


def dataset_mean(scores: torch.Tensor) -> torch.Tensor:
    """^D average: the mean of a ``(C,)`` per-class score of the data set's confusion matrix over the classes where it
    is defined (not NaN); float64 scalar, 0 if none.

    mIoU^D with ``iou_from_confusion`` (classes in the ground truth or the prediction), mAcc^D with
    ``accuracy_from_confusion`` (classes in the ground truth), mDice^D with ``dice_from_confusion``.
    """
    present = ~scores.isnan()
    return scores[present].mean() if present.any() else scores.new_zeros(())


SCORES = ("acc", "iou", "dice")
"""Order of the per-image / per-class scores of ``image_statistics`` (``ImageStats.scores``, ``class_score_sum``)."""


class ImageStats(NamedTuple):
    """Per-image scores and per-class sums behind the ^I and ^C metrics (``image_statistics``)."""

    scores: torch.Tensor  # (B, 3) float64: per image, mean Acc / IoU / Dice over its active classes (0 if none)
    kept: torch.Tensor  # (B,) bool: images with at least one counted pixel (= at least one active class)
    active: torch.Tensor  # (B, C) bool: class in the image's counted ground truth
    class_score_sum: torch.Tensor  # (3, C) float64: per class, Acc / IoU / Dice summed over the images where active
    class_image_count: torch.Tensor  # (C,) long: images in which the class is active


def image_statistics(confmats: torch.Tensor) -> ImageStats:
    """Per-image Acc, IoU and Dice statistics from ``(B, C, C)`` per-image confusion matrices.

    A class is *active* in an image when it is in the image's counted ground truth (a class that is only predicted
    is not: the rule of the official evaluation code). Its per-image scores are ``tp / (tp + fn)``,
    ``tp / (tp + fp + fn)`` and ``2 tp / (2 tp + fp + fn)`` (all denominators are positive for an active class).
    Each image's scores are averaged over its active classes; each class's scores are summed over the images where
    it is active. Images without counted pixels have no active class: ``kept`` is False and they add nothing.
    """
    cm = confmats.double()
    tp = cm.diagonal(dim1=-2, dim2=-1)  # (B, C)
    gt, pr = cm.sum(-1), cm.sum(-2)  # tp + fn, tp + fp
    active = gt > 0
    per_class = torch.stack([tp / gt, tp / (gt + pr - tp), 2 * tp / (gt + pr)])  # (3, B, C), NaN / inf off active
    per_class = torch.where(active, per_class, torch.zeros_like(per_class))
    n_active = active.sum(1)  # (B,)
    return ImageStats(
        scores=(per_class.sum(-1) / n_active.clamp_min(1)).T.contiguous(),
        kept=n_active > 0,
        active=active,
        class_score_sum=per_class.sum(1),
        class_image_count=active.sum(0),
    )


def class_mean(class_score_sum: torch.Tensor, class_image_count: torch.Tensor) -> torch.Tensor:
    """^C average: per class, the mean score over the images where it is active, then the mean over the classes
    active in at least one image (classes never active are left out).

    Args:
        class_score_sum: ``(..., C)`` per-class sums (e.g. ``ImageStats.class_score_sum``, ``(3, C)``).
        class_image_count: ``(C,)`` images per class.

    Returns:
        ``(...)`` float64; 0 where no class was ever active.
    """
    seen = class_image_count > 0
    if not seen.any():
        return class_score_sum.new_zeros(class_score_sum.shape[:-1])
    return (class_score_sum[..., seen] / class_image_count[seen]).mean(-1)


def worst_case_mean(values: torch.Tensor, q: int) -> torch.Tensor:
    """Mean of the worst (lowest) ``q`` percent of ``N`` per-image values: ``n = max(1, floor(q N / 100))``.

    Args:
        values: ``(N, ...)`` one row per image (e.g. ``(N, 3)`` Acc / IoU / Dice); each column on its own.
        q: percentage, ``1 <= q <= 100`` (``q = 100`` is the plain mean).

    Returns:
        ``(...)`` float64 (0 when ``N = 0``). ``floor(q N / 100)`` is exact integer arithmetic.
    """
    n_img = values.shape[0]
    if n_img == 0:
        return values.new_zeros(values.shape[1:], dtype=torch.float64)
    n = max(1, q * n_img // 100)
    return values.double().sort(0).values[:n].mean(0)


# --------------------------------------------------------------------------------------------------------------------
# Calibration histograms


def calibration_bins(values: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Equal-width bin of each probability in ``[0, 1]``: ``min(floor(v * n_bins), n_bins - 1)``, int32."""
    return (values * n_bins).to(torch.int32).clamp_(max=n_bins - 1)


def _groups_like(group: torch.Tensor | None, bins: torch.Tensor) -> torch.Tensor:
    """Group of every entry as int32 shaped like ``bins`` (all 0 when ``group`` is ``None``)."""
    return torch.zeros_like(bins) if group is None else group.to(torch.int32).reshape(bins.shape)


def _image_slots(group: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, int]:
    """Per-image group slots: group ``j`` of image ``i`` (leading dimension of ``group``) becomes slot
    ``i * (G + 1) + j``; an uncounted pixel (group ``>= G``) goes to its image's spare slot ``i * (G + 1) + G``.
    Returns the int32 slots (shaped like ``group``) and the number of slots ``B (G + 1)``."""
    b = group.shape[0]
    offset = torch.arange(b, device=group.device, dtype=torch.int32).view(b, *[1] * (group.ndim - 1))
    return group.to(torch.int32).clamp(max=num_groups).add_(offset * (num_groups + 1)), b * (num_groups + 1)


def calibration_histogram(
    confidence: torch.Tensor,
    correct: torch.Tensor,
    n_bins: int,
    group: torch.Tensor | None = None,
    num_groups: int = 1,
    per_image: bool = False,
) -> torch.Tensor:
    """Top-label reliability histogram: pixels binned by confidence.

    Args:
        confidence: ``(...)`` probability of the predicted class, in ``[0, 1]``.
        correct: ``(...)`` bool (or 0/1), whether the prediction equals the label.
        n_bins: equal-width bins over ``[0, 1]``.
        group, num_groups: see the module docstring.
        per_image: one histogram per entry of the leading dimension of ``confidence`` (``B`` images), still from
            single histograms (the image is part of the index).

    Returns:
        ``(G, n_bins, 3)`` float64 (``(n_bins, 3)`` without ``group``): per bin ``(count, sum of confidence, number
        correct)``; with ``per_image`` a leading ``B`` dimension is added.
    """
    bins = calibration_bins(confidence, n_bins)
    b = bins.shape[0] if per_image else 1
    bins = bins.reshape(b, -1)
    slot, slots = _image_slots(_groups_like(group, bins), num_groups)  # uncounted groups: a spare slot per image
    idx = (slot * n_bins).add_(bins)
    size = slots * n_bins
    hist = torch.stack(
        [_bincount(idx, size).double(), _bincount(idx, size, confidence), _bincount(idx, size, correct)], dim=-1
    ).view(b, num_groups + 1, n_bins, 3)[:, :num_groups]
    hist = hist if per_image else hist[0]
    return hist if group is not None else hist.select(-3, 0)


def confident_mask(probs: torch.Tensor, confidence: torch.Tensor, n_bins: int) -> torch.Tensor:
    """The ``(pixel, class)`` pairs that ``top_label_and_confident_histogram`` visits: ``p_k >= min(confidence,
    1 / n_bins)`` (float32 arithmetic, as the bins), so that every pixel's top class is one of them even when its
    confidence is below ``1 / n_bins``.

    ``probs`` ``(B, C, ...)``, ``confidence`` ``(B, ...)``; returns a ``(B, C, N)`` bool mask (``torch.count_nonzero``
    of it is the ``num_pairs`` of ``top_label_and_confident_histogram``)."""
    b, c = probs.shape[:2]
    return probs.reshape(b, c, -1) >= confidence.reshape(b, 1, -1).clamp(max=1.0 / n_bins)


def confident_pairs(
    probs: torch.Tensor, threshold: float | torch.Tensor, size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every entry of ``probs`` ``(C, N)`` (or a batch ``(B, C, N)``) with ``p >= threshold``, in row-major order.

    Args:
        probs: ``(C, N)`` or ``(B, C, N)``.
        threshold: a float, or a tensor broadcastable to ``probs`` (``(B, 1, N)``: one per pixel).
        size: the number of such entries, if known: they are then found by ``nonzero_static``, which does not read the
            count back to the host as ``nonzero`` does on CUDA.

    Returns:
        ``(row, pix, p)``: three ``(P,)`` tensors (long, long, dtype of ``probs``); ``row`` is the class of a
        ``(C, N)`` input and ``b * C + k`` (image ``b``, class ``k``) for a batch. A pixel whose probabilities sum to
        1 has at most ``1 / threshold`` such entries.
    """
    return _pairs_of_mask(probs, probs >= threshold, size)


def _pairs_of_mask(
    probs: torch.Tensor, mask: torch.Tensor, size: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``confident_pairs`` of a mask shaped like ``probs``."""
    mask = mask.reshape(-1)
    flat = (mask.nonzero() if size is None else torch.nonzero_static(mask, size=size)).squeeze(1)
    row, p = flat // probs.shape[-1], probs.reshape(-1).take(flat)
    return row, flat.sub_(row * probs.shape[-1]), p


def top_label_from_pairs(
    cls: torch.Tensor, pix: torch.Tensor, p: torch.Tensor, confidence: torch.Tensor
) -> torch.Tensor:
    """Predicted class of each of ``N`` pixels, read from its ``confident_pairs``: the class whose ``p`` equals the
    pixel's ``confidence`` (its maximum probability, ``(N,)``). Returns ``(N,)`` long; a pixel with no such pair
    (confidence below the pairs' threshold) gets 0. On an exact tie any of the tied classes may be returned."""
    n = confidence.shape[0]
    top = torch.where(p == confidence[pix], pix, n)  # other pairs go to a spare slot
    return torch.zeros(n + 1, dtype=torch.long, device=confidence.device).scatter_(0, top, cls)[:n]


class TopLabelScan(NamedTuple):
    """Result of ``top_label_and_confident_histogram``."""

    pred: torch.Tensor  # (B, N) long: predicted class of every pixel
    count: torch.Tensor  # ([B,] G, C, n_bins) float64: (pixel, class) pairs with p_k >= 1 / n_bins, per bin of p_k
    p_sum: torch.Tensor  # ([B,] G, C, n_bins) float64: their sum of p_k


def top_label_and_confident_histogram(
    probs: torch.Tensor,
    confidence: torch.Tensor,
    n_bins: int,
    group: torch.Tensor | None = None,
    num_groups: int = 1,
    per_image: bool = False,
    mask: torch.Tensor | None = None,
    num_pairs: int | None = None,
) -> TopLabelScan:
    """One pass, over all images at once, over the ``(pixel, class)`` pairs with ``p_k >= min(confidence, 1 / n_bins)``.

    Every pixel has at most ``n_bins`` pairs with ``p_k >= 1 / n_bins`` (or only its top class when its confidence is
    lower), and they hold its predicted class: the pass yields the prediction and the part of the static-calibration
    histogram above the first bin of each class (from the pairs with ``p_k >= 1 / n_bins``).

    Args:
        probs: ``(B, C, ...)`` probabilities summing to 1 over dim 1.
        confidence: ``(B, ...)`` ``probs.amax(1)``.
        n_bins: calibration bins.
        group, num_groups: see the module docstring (the histograms always have the leading ``G`` dimension).
        per_image: keep one histogram per image (leading ``B`` dimension) instead of their sum.
        mask: ``confident_mask(probs, confidence, n_bins)``, if at hand.
        num_pairs: the number of True entries of that mask, read on the host, if at hand: then nothing here waits for
            the device.
    """
    b, c = probs.shape[:2]
    flat = probs.reshape(b, c, -1)
    n, nb, g = flat.shape[-1], n_bins, num_groups
    conf = confidence.reshape(b * n)
    grp = torch.zeros(b * n, dtype=torch.int32, device=probs.device) if group is None else group.reshape(b * n)
    mask = confident_mask(flat, confidence, nb) if mask is None else mask
    # (In place where possible: on the CPU, allocating each (P,) temporary costs as much as the arithmetic.)
    row, pix, p = _pairs_of_mask(flat, mask, num_pairs)  # row: image * C + class
    cls = row % c
    pix = (row // c).mul_(n).add_(pix)  # pixel among all B * N
    pred = top_label_from_pairs(cls, pix, p, conf).view(b, n)
    # pairs below 1 / n_bins (a low-confidence pixel's top class) and uncounted groups go to a spare group slot
    pair_group = torch.where(p >= 1.0 / nb, grp.clamp(max=g).take(pix), g)
    key = row.mul_(g + 1).add_(pair_group).mul_(nb).add_(calibration_bins(p, nb))  # (image, class, group, bin)
    size = b * c * (g + 1) * nb
    count = _bincount(key, size).double().view(b, c, g + 1, nb).transpose(1, 2)[:, :g]
    p_sum = _bincount(key, size, p).view(b, c, g + 1, nb).transpose(1, 2)[:, :g]
    return TopLabelScan(pred, count, p_sum) if per_image else TopLabelScan(pred, count.sum(0), p_sum.sum(0))


def _group_totals(flat: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(B, G, C)`` float64 sums of ``flat`` ``(B, C, N)`` over the pixels of each group (``masks`` ``(B, N, G)``).

    Batched matrix products (much faster than a strided masked sum), one per image over ``K = gcd(N, 64)`` chunks of
    the pixels: each chunk's float32 sum is rounded on its own and the chunks are added in float64, which keeps the
    totals ~K times more accurate than one float32 product over all ``N`` pixels, at the same cost."""
    b, c, n = flat.shape
    k = math.gcd(n, 64)
    m = n // k
    out = [torch.bmm(flat[i].view(c, k, m).transpose(0, 1), masks[i].view(k, m, -1)).double().sum(0) for i in range(b)]
    return torch.stack(out).transpose(1, 2)


def class_calibration_histogram(
    probs: torch.Tensor,
    label: torch.Tensor,
    n_bins: int,
    group: torch.Tensor | None = None,
    num_groups: int = 1,
    confident: tuple[torch.Tensor, torch.Tensor] | None = None,
    per_image: bool = False,
) -> torch.Tensor:
    """Static-calibration histogram: for every class ``k``, all pixels binned by ``p_k``.

    Only the ``(pixel, class)`` pairs with ``p_k >= 1 / n_bins`` are visited; the first bin of each class is the
    per-class total minus the other bins.

    Args:
        probs: ``(B, C, ...)`` probabilities summing to 1 over dim 1.
        label: ``(B, ...)`` class ids (clamped to ``[0, C)``; pixels that hold an ignore label must be left out
            through ``group``).
        n_bins: calibration bins.
        group, num_groups: see the module docstring.
        confident: ``(count, p_sum)`` of ``top_label_and_confident_histogram`` for the same inputs and the same
            ``per_image``, to reuse that pass; computed here when ``None``.
        per_image: one histogram per image (leading ``B`` dimension), still from single histograms.

    Returns:
        ``(G, C, n_bins, 3)`` float64 (``(C, n_bins, 3)`` without ``group``): per class and bin of ``p_k``
        ``(count, sum of p_k, number labelled k)``; with ``per_image`` a leading ``B`` dimension is added. Every
        counted pixel is in exactly one bin of every class.
    """
    b, c = probs.shape[:2]
    flat = probs.reshape(b, c, -1)
    n, nb, g = flat.shape[-1], n_bins, num_groups
    grp = torch.zeros(b, n, dtype=torch.int32, device=probs.device) if group is None else group.reshape(b, n)
    if confident is None:
        confident = top_label_and_confident_histogram(flat, flat.amax(1), nb, grp, g, per_image=per_image)[1:]
    count, p_sum = confident if per_image else (confident[0][None], confident[1][None])  # (B or 1, G, C, nb)
    label = label.reshape(b, n).clamp(0, c - 1).to(torch.int32)
    p_label = flat.gather(1, label.long().view(b, 1, n)).view(b, n)
    slot, slots = _image_slots(grp, g)  # image and group of every pixel, uncounted pixels in a spare slot
    idx = ((slot * c).add_(label) * nb).add_(calibration_bins(p_label, nb)).view(-1)
    size = slots * c * nb
    labelled = _bincount(idx, size).double().view(b, g + 1, c, nb)[:, :g]  # bin 0 included
    masks = torch.stack([grp == j for j in range(g)], dim=-1).to(flat.dtype)  # (B, N, G)
    p_total = _group_totals(flat, masks)  # (B, G, C)
    n_pix = masks.sum(1).double()  # (B, G)
    if not per_image:
        labelled, p_total, n_pix = labelled.sum(0, keepdim=True), p_total.sum(0, keepdim=True), n_pix.sum(0, True)
    hist = torch.stack([count, p_sum, labelled], dim=-1)  # (B or 1, G, C, nb, 3)
    hist[..., 0, 0] += n_pix[..., None] - count.sum(-1)
    hist[..., 0, 1] += p_total - p_sum.sum(-1)
    hist = hist if per_image else hist[0]
    return hist if group is not None else hist.select(-4, 0)


# --------------------------------------------------------------------------------------------------------------------
# Boundary restriction


def boundary_regions(target: torch.Tensor, kernel_size: int, ignore_index: int) -> torch.Tensor:
    """Region id of every pixel of ``target`` ``(B, H, W)``: ``INTERIOR`` (0), ``BOUNDARY`` (1, per
    ``segjml.labels.boundary_map`` with ``kernel_size``) or ``IGNORED`` (2); int32 ``(B, H, W)``.

    Used as ``group`` with ``num_groups=2``: ignored pixels are left out of every histogram."""
    boundary = boundary_map(target, kernel_size, ignore_index)
    return torch.where(target != ignore_index, boundary.to(torch.int32), IGNORED)


def all_and_boundary(hist: torch.Tensor) -> torch.Tensor:
    """``(2, ...)`` histograms of ``[all counted pixels, boundary pixels]`` from per-region ones ``(2, ...)``
    (``[INTERIOR, BOUNDARY]``)."""
    return torch.stack([hist[INTERIOR] + hist[BOUNDARY], hist[BOUNDARY]])


# --------------------------------------------------------------------------------------------------------------------
# Calibration errors


def expected_calibration_error(hist: torch.Tensor) -> torch.Tensor:
    """ECE ``sum_b (n_b / N) |acc_b - conf_b| = sum_b |correct_b - conf_sum_b| / N`` of ``(..., n_bins, 3)``
    ``calibration_histogram`` (e.g. one per image); float64 ``(...)`` in ``[0, 1]``, 0 for an empty histogram."""
    n = hist[..., 0].sum(-1)
    err = (hist[..., 2] - hist[..., 1]).abs().sum(-1)
    return torch.where(n > 0, err / n.clamp_min(1), torch.zeros_like(n))


def static_calibration_error(hist: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """SCE ``(1/K) sum_{k in K} sum_b (n_bk / N) |acc_bk - conf_bk|`` of ``(..., C, n_bins, 3)``
    ``class_calibration_histogram`` (e.g. one per image).

    Args:
        hist: the histogram(s).
        classes: ``(..., C)`` bool, the class set ``K`` to average over; ``None``: all ``C`` classes.

    Returns:
        float64 ``(...)`` in ``[0, 1]``; 0 for an empty histogram or an empty class set.
    """
    n = hist[..., 0, :, 0].sum(-1)  # every pixel is binned once per class
    per_class = (hist[..., 2] - hist[..., 1]).abs().sum(-1)  # (..., C): N times the class's calibration error
    if classes is None:
        total, k = per_class.sum(-1), torch.full_like(n, hist.shape[-3])
    else:
        total, k = torch.where(classes, per_class, torch.zeros_like(per_class)).sum(-1), classes.sum(-1).double()
    ok = (n > 0) & (k > 0)
    return torch.where(ok, total / (n * k).clamp_min(1), torch.zeros_like(n))


def reliability_from_histogram(hist: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-bin ``count``, mean ``confidence`` and ``accuracy`` (0 in empty bins) of a ``(n_bins, 3)``
    ``calibration_histogram``."""
    count = hist[:, 0]
    return {
        "count": count,
        "confidence": hist[:, 1] / count.clamp_min(1),
        "accuracy": hist[:, 2] / count.clamp_min(1),
    }
