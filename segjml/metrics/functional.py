"""Pure tensor functions behind ``SegmentationMetrics``: confusion matrices, IoU, calibration histograms, errors.

Definitions and the layout of every histogram are in ``docs/metrics.md`` (section "Metric functions"). Shapes use
``B`` images, ``C`` classes, ``N`` pixels per image (any trailing spatial shape is flattened) and ``G`` groups.

Groups. The histogram functions take an optional integer ``group`` per pixel and return one histogram per group
``0 .. num_groups - 1`` (leading dimension ``G``); pixels whose group is ``num_groups`` or more are not counted, and
without ``group`` every pixel is counted and the leading dimension is left out. ``SegmentationMetrics`` groups pixels
by ``boundary_regions`` (interior, boundary, ignored) and sums the groups with ``all_and_boundary``.

Everything runs on the device of its inputs; there is no Python loop over pixels or classes (only over images, in
``top_label_and_confident_histogram``, to bound memory).
"""

from __future__ import annotations

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
    """Per-class IoU ``|gt & pred| / |gt | pred|`` of ``(..., C, C)`` confusion matrices.

    Returns:
        ``(..., C)`` float64 in ``[0, 1]``; NaN for a class absent from both ground truth and prediction.
    """
    cm = confmat.double()
    inter = cm.diagonal(dim1=-2, dim2=-1)
    union = cm.sum(-2) + cm.sum(-1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))


def pixel_accuracy(confmat: torch.Tensor) -> torch.Tensor:
    """Share of counted pixels predicted right, from a ``(C, C)`` confusion matrix: float64 scalar (0 if empty)."""
    cm = confmat.double()
    total = cm.sum()
    return cm.diagonal().sum() / total if total > 0 else total * 0


def mean_iou(iou: torch.Tensor) -> torch.Tensor:
    """mIoU^D: mean of a ``(C,)`` per-class IoU over the classes present (not NaN); float64 scalar, 0 if none."""
    present = ~iou.isnan()
    return iou[present].mean() if present.any() else iou.new_zeros(())


class ImageIoUStats(NamedTuple):
    """Sums behind mIoU^I and mIoU^C (the state of ``SegmentationMetrics`` of the same names)."""

    image_iou_sum: torch.Tensor  # () float64: sum over images of the image's mean IoU over its classes
    image_count: torch.Tensor  # () long: images with at least one counted pixel
    class_iou_sum: torch.Tensor  # (C,) float64: sum over images of the class's IoU, where it occurs
    class_image_count: torch.Tensor  # (C,) long: images in which the class occurs


def image_iou_statistics(confmats: torch.Tensor) -> ImageIoUStats:
    """Per-image IoU statistics from ``(B, C, C)`` per-image confusion matrices.

    A class occurs in an image when it is in the image's (counted) ground truth or prediction. Each image's IoU is
    averaged over the classes that occur in it; each class's IoU is summed over the images where it occurs. Images
    without counted pixels add nothing.
    """
    iou = iou_from_confusion(confmats)  # (B, C)
    occurs = ~iou.isnan()
    iou = torch.where(occurs, iou, torch.zeros_like(iou))
    n_occ = occurs.sum(1)
    return ImageIoUStats(
        image_iou_sum=(iou.sum(1) / n_occ.clamp_min(1)).sum(),
        image_count=(n_occ > 0).sum(),
        class_iou_sum=iou.sum(0),
        class_image_count=occurs.sum(0),
    )


def image_mean_iou(image_iou_sum: torch.Tensor, image_count: torch.Tensor) -> torch.Tensor:
    """mIoU^I: mean over images of the per-image mean IoU; float64 scalar, 0 without images."""
    return image_iou_sum / image_count.clamp_min(1)


def class_mean_iou(class_iou_sum: torch.Tensor, class_image_count: torch.Tensor) -> torch.Tensor:
    """mIoU^C: per class, the mean IoU over the images where it occurs, then the mean over classes that occur in
    some image; float64 scalar, 0 if none."""
    seen = class_image_count > 0
    per_class = class_iou_sum[seen] / class_image_count[seen]
    return per_class.mean() if seen.any() else per_class.new_zeros(())


# --------------------------------------------------------------------------------------------------------------------
# Calibration histograms


def calibration_bins(values: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Equal-width bin of each probability in ``[0, 1]``: ``min(floor(v * n_bins), n_bins - 1)``, int32."""
    return (values * n_bins).to(torch.int32).clamp_(max=n_bins - 1)


def _groups_like(group: torch.Tensor | None, bins: torch.Tensor) -> torch.Tensor:
    """Group of every entry as int32 shaped like ``bins`` (all 0 when ``group`` is ``None``)."""
    return torch.zeros_like(bins) if group is None else group.to(torch.int32).reshape(bins.shape)


def calibration_histogram(
    confidence: torch.Tensor,
    correct: torch.Tensor,
    n_bins: int,
    group: torch.Tensor | None = None,
    num_groups: int = 1,
) -> torch.Tensor:
    """Top-label reliability histogram: pixels binned by confidence.

    Args:
        confidence: ``(...)`` probability of the predicted class, in ``[0, 1]``.
        correct: ``(...)`` bool (or 0/1), whether the prediction equals the label.
        n_bins: equal-width bins over ``[0, 1]``.
        group, num_groups: see the module docstring.

    Returns:
        ``(G, n_bins, 3)`` float64 (``(n_bins, 3)`` without ``group``): per bin ``(count, sum of confidence, number
        correct)``.
    """
    bins = calibration_bins(confidence, n_bins)
    idx = (_groups_like(group, bins) * n_bins).add_(bins).view(-1)
    size = (num_groups + 1) * n_bins
    hist = torch.stack(
        [
            torch.bincount(idx, minlength=size).double(),
            torch.bincount(idx, weights=confidence.reshape(-1).double(), minlength=size),
            torch.bincount(idx, weights=correct.reshape(-1).double(), minlength=size),
        ],
        dim=-1,
    )[: num_groups * n_bins].view(num_groups, n_bins, 3)
    return hist if group is not None else hist[0]


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
    count: torch.Tensor  # (G, C, n_bins) float64: (pixel, class) pairs with p_k >= 1 / n_bins, per bin of p_k
    p_sum: torch.Tensor  # (G, C, n_bins) float64: their sum of p_k


def top_label_and_confident_histogram(
    probs: torch.Tensor,
    confidence: torch.Tensor,
    n_bins: int,
    group: torch.Tensor | None = None,
    num_groups: int = 1,
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
    """
    b, c = probs.shape[:2]
    flat = probs.reshape(b, c, -1)
    n, nb = flat.shape[-1], n_bins
    conf = confidence.reshape(b, n)
    grp = torch.zeros(b, n, dtype=torch.int32, device=probs.device) if group is None else group.reshape(b, n)
    pred = torch.empty(b, n, dtype=torch.long, device=probs.device)
    count = torch.zeros(num_groups, c, nb, dtype=torch.float64, device=probs.device)
    p_sum = torch.zeros_like(count)
    for i in range(b):
        cls, pix, p = confident_pairs(flat[i], 1.0 / nb)
        pred[i] = top_label_from_pairs(cls, pix, p, conf[i])
        image_count, image_p_sum = pair_histogram(cls, p, grp[i][pix], c, nb, num_groups)
        count += image_count
        p_sum += image_p_sum
    low = conf < 1.0 / nb  # possible only when C > n_bins: take the argmax of those few pixels directly
    if c > nb and low.any():
        bi, pi = low.nonzero(as_tuple=True)
        pred[bi, pi] = flat[bi, :, pi].argmax(1)
    return TopLabelScan(pred, count, p_sum)


def class_calibration_histogram(
    probs: torch.Tensor,
    label: torch.Tensor,
    n_bins: int,
    group: torch.Tensor | None = None,
    num_groups: int = 1,
    confident: tuple[torch.Tensor, torch.Tensor] | None = None,
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
        confident: ``(count, p_sum)`` of ``top_label_and_confident_histogram`` for the same inputs, to reuse that
            pass; computed here when ``None``.

    Returns:
        ``(G, C, n_bins, 3)`` float64 (``(C, n_bins, 3)`` without ``group``): per class and bin of ``p_k``
        ``(count, sum of p_k, number labelled k)``. Every counted pixel is in exactly one bin of every class.
    """
    b, c = probs.shape[:2]
    flat = probs.reshape(b, c, -1)
    n, nb = flat.shape[-1], n_bins
    grp = torch.zeros(b, n, dtype=torch.int32, device=probs.device) if group is None else group.reshape(b, n)
    if confident is None:
        confident = top_label_and_confident_histogram(flat, flat.amax(1), nb, grp, num_groups)[1:]
    count, p_sum = confident
    label = label.reshape(b, n).clamp(0, c - 1).to(torch.int32)
    p_label = flat.gather(1, label.long().view(b, 1, n)).view(b, n)
    idx = ((grp.to(torch.int32) * c).add_(label) * nb).add_(calibration_bins(p_label, nb)).view(-1)
    size, keep = (num_groups + 1) * c * nb, num_groups * c * nb
    labelled = torch.bincount(idx, minlength=size)[:keep].double().view(num_groups, c, nb)  # bin 0 included
    masks = torch.stack([grp == g for g in range(num_groups)], dim=-1).to(flat.dtype)  # (B, N, G)
    p_total = torch.bmm(flat, masks).sum(0).T.double()  # (G, C): one batched matrix product, not a strided sum
    n_pix = masks.sum((0, 1)).double()  # (G,)
    hist = torch.stack([count, p_sum, labelled], dim=-1)  # (G, C, nb, 3)
    hist[:, :, 0, 0] += n_pix[:, None] - count.sum(-1)
    hist[:, :, 0, 1] += p_total - p_sum.sum(-1)
    return hist if group is not None else hist[0]


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
    """ECE ``sum_b (n_b / N) |acc_b - conf_b| = sum_b |correct_b - conf_sum_b| / N`` of a ``(n_bins, 3)``
    ``calibration_histogram``; float64 scalar in ``[0, 1]``, 0 when empty."""
    n = hist[:, 0].sum()
    return (hist[:, 2] - hist[:, 1]).abs().sum() / n if n > 0 else n * 0


def static_calibration_error(hist: torch.Tensor) -> torch.Tensor:
    """SCE ``(1/C) sum_k sum_b (n_bk / N) |acc_bk - conf_bk|`` of a ``(C, n_bins, 3)``
    ``class_calibration_histogram``; float64 scalar in ``[0, 1]``, 0 when empty."""
    n = hist[0, :, 0].sum()  # every pixel is binned once per class
    return (hist[:, :, 2] - hist[:, :, 1]).abs().sum() / (n * hist.shape[0]) if n > 0 else n * 0


def reliability_from_histogram(hist: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-bin ``count``, mean ``confidence`` and ``accuracy`` (0 in empty bins) of a ``(n_bins, 3)``
    ``calibration_histogram``."""
    count = hist[:, 0]
    return {
        "count": count,
        "confidence": hist[:, 1] / count.clamp_min(1),
        "accuracy": hist[:, 2] / count.clamp_min(1),
    }
