"""Pure tensor functions behind ``SegmentationMetrics``: confusion matrices, Acc / IoU / Dice per data set, image and
class, worst-case means, calibration histograms, errors.

Definitions and the layout of every histogram are in ``docs/metrics.md`` (section "Metric functions"). Shapes use
``B`` images, ``C`` classes, ``N`` pixels per image (any trailing spatial shape is flattened) and ``G`` groups.

Groups. The histogram functions take an optional integer ``group`` per pixel and return one histogram per group
``0 .. num_groups - 1`` (leading dimension ``G``); pixels whose group is ``num_groups`` or more are not counted, and
without ``group`` every pixel is counted and the leading dimension is left out. ``SegmentationMetrics`` groups pixels
by ``boundary_regions`` (interior, boundary, ignored) and sums the groups with ``all_and_boundary``. With
``per_image=True`` they return one histogram per image (a further leading ``B`` dimension) from the same single
``bincount`` (the image is part of the index).

Everything runs on the device of its inputs; there is no Python loop over pixels or classes (only over images, in
``top_label_and_confident_histogram`` to bound memory and in the per-class totals of the SCE histogram).
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


def image_confusion_matrices(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """One confusion matrix per image, by a single ``bincount``.

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
    return torch.bincount(idx.view(-1), minlength=b * c * c + 1)[: b * c * c].view(b, c, c)


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


def mean_iou(iou: torch.Tensor) -> torch.Tensor:
    """Mean of a ``(C,)`` per-class score over the classes where it is defined (not NaN); float64 scalar, 0 if none.

    mIoU^D with ``iou_from_confusion`` (classes in the ground truth or the prediction); the same average gives
    mAcc^D with ``accuracy_from_confusion`` (classes in the ground truth) and mDice^D with ``dice_from_confusion``.
    """
    present = ~iou.isnan()
    return iou[present].mean() if present.any() else iou.new_zeros(())


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
        per_image: one histogram per entry of the leading dimension of ``confidence`` (``B`` images), still by a
            single ``bincount`` (the image is part of the index).

    Returns:
        ``(G, n_bins, 3)`` float64 (``(n_bins, 3)`` without ``group``): per bin ``(count, sum of confidence, number
        correct)``; with ``per_image`` a leading ``B`` dimension is added.
    """
    bins = calibration_bins(confidence, n_bins)
    grp = _groups_like(group, bins)
    if per_image:
        b = bins.shape[0]
        grp, slots = _image_slots(grp, num_groups)
    else:
        b, slots = 1, num_groups + 1  # groups beyond the spare one fall past `size` and are cut off
    idx = (grp * n_bins).add_(bins).view(-1)
    size = slots * n_bins
    hist = torch.stack(
        [
            torch.bincount(idx, minlength=size)[:size].double(),
            torch.bincount(idx, weights=confidence.reshape(-1).double(), minlength=size)[:size],
            torch.bincount(idx, weights=correct.reshape(-1).double(), minlength=size)[:size],
        ],
        dim=-1,
    ).view(b, num_groups + 1, n_bins, 3)[:, :num_groups]
    hist = hist if per_image else hist[0]
    return hist if group is not None else hist.select(-3, 0)


def _nonzero_sparse(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the True entries of a sparse bool tensor: scan it as int64 words first (8x fewer elements),
    then look only inside the words that hold a True. Same result as ``mask.reshape(-1).nonzero()``."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.uint8).view(torch.int64)
    hit = words.nonzero().squeeze(1)
    row, col = words[hit].view(torch.uint8).view(-1, 8).nonzero(as_tuple=True)
    return hit[row] * 8 + col


def confident_pairs(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every ``(class, pixel)`` entry of ``probs`` ``(C, N)`` with ``p >= threshold``, in class-major order.

    Returns:
        ``(cls, pix, p)``: three ``(P,)`` tensors (long, long, dtype of ``probs``). A pixel whose probabilities sum
        to 1 has at most ``1 / threshold`` such entries.
    """
    c, n = probs.shape
    mask = probs >= threshold
    if c * threshold > 4:  # at most 1 / threshold pairs per pixel among c classes: sparse
        flat = _nonzero_sparse(mask)
        cls = flat // n
        return cls, flat - cls * n, probs.view(-1)[flat]
    cls, pix = mask.nonzero(as_tuple=True)
    return cls, pix, probs[cls, pix]


def top_label_from_pairs(
    cls: torch.Tensor, pix: torch.Tensor, p: torch.Tensor, confidence: torch.Tensor
) -> torch.Tensor:
    """Predicted class of each of ``N`` pixels, read from its ``confident_pairs``: the class whose ``p`` equals the
    pixel's ``confidence`` (its maximum probability, ``(N,)``). Returns ``(N,)`` long; a pixel with no such pair
    (confidence below the pairs' threshold) gets 0. On an exact tie any of the tied classes may be returned."""
    n = confidence.shape[0]
    top = torch.where(p == confidence[pix], pix, n)  # other pairs go to a spare slot
    return torch.zeros(n + 1, dtype=torch.long, device=confidence.device).scatter_(0, top, cls)[:n]


def pair_histogram(
    cls: torch.Tensor, p: torch.Tensor, pair_group: torch.Tensor, num_classes: int, n_bins: int, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, class and bin of ``p``: number of pairs and sum of ``p``, each ``(G, C, n_bins)`` float64.

    ``cls``, ``p`` and ``pair_group`` are ``(P,)`` (class, probability, group of the pair's pixel).
    """
    c, nb = num_classes, n_bins
    idx = (pair_group.to(torch.int32) * c + cls) * nb + calibration_bins(p, nb)
    size, keep = (num_groups + 1) * c * nb, num_groups * c * nb
    count = torch.bincount(idx, minlength=size)[:keep].double().view(num_groups, c, nb)
    p_sum = torch.bincount(idx, weights=p.double(), minlength=size)[:keep].view(num_groups, c, nb)
    return count, p_sum


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
) -> TopLabelScan:
    """One pass, image by image, over the ``(pixel, class)`` pairs with ``p_k >= 1 / n_bins``.

    Every pixel has at most ``n_bins`` such pairs, and they hold its predicted class whenever its confidence is
    ``>= 1 / n_bins`` (always when ``C <= n_bins``): the pass yields the prediction (the few other pixels take a
    direct argmax) and the part of the static-calibration histogram above the first bin of each class.

    Args:
        probs: ``(B, C, ...)`` probabilities summing to 1 over dim 1.
        confidence: ``(B, ...)`` ``probs.amax(1)``.
        n_bins: calibration bins.
        group, num_groups: see the module docstring (the histograms always have the leading ``G`` dimension).
        per_image: keep one histogram per image (leading ``B`` dimension) instead of their sum.
    """
    b, c = probs.shape[:2]
    flat = probs.reshape(b, c, -1)
    n, nb = flat.shape[-1], n_bins
    conf = confidence.reshape(b, n)
    grp = torch.zeros(b, n, dtype=torch.int32, device=probs.device) if group is None else group.reshape(b, n)
    pred = torch.empty(b, n, dtype=torch.long, device=probs.device)
    count = torch.zeros(b, num_groups, c, nb, dtype=torch.float64, device=probs.device)
    p_sum = torch.zeros_like(count)
    for i in range(b):
        cls, pix, p = confident_pairs(flat[i], 1.0 / nb)
        pred[i] = top_label_from_pairs(cls, pix, p, conf[i])
        count[i], p_sum[i] = pair_histogram(cls, p, grp[i][pix], c, nb, num_groups)
    low = conf < 1.0 / nb  # possible only when C > n_bins: take the argmax of those few pixels directly
    if c > nb and low.any():
        bi, pi = low.nonzero(as_tuple=True)
        pred[bi, pi] = flat[bi, :, pi].argmax(1)
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
        per_image: one histogram per image (leading ``B`` dimension), still by a single ``bincount``.

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
    labelled = torch.bincount(idx, minlength=size).double().view(b, g + 1, c, nb)[:, :g]  # bin 0 included
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
