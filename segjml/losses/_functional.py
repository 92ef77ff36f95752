"""Pure functions behind the losses: per-class statistics, Jaccard metric losses, soft cross-entropy, Lovasz.

Shapes: ``probs`` (B, C, H, W) softmax probabilities; a *target* is one of
  - hard labels ``(B, H, W)`` int64 (may hold ``ignore_index``),
  - :class:`~segjml.labels.SmoothedLabels` (hard labels + per-pixel smoothing, e.g. BLS),
  - soft labels ``(B, C, H, W)`` float, a distribution over classes at every kept pixel.
``keep`` is a ``(B, H, W)`` bool mask of the pixels that count.

Statistics are kept per image and class (B, C) so that the dataset-level (mIoU^D), per-image (mIoU^I) and
per-class (mIoU^C) losses of paper section 6.1 all come from one pass. Hard labels never build a one-hot tensor:
the label-class terms are gathered and scattered per pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segjml.labels.soft_labels import SmoothedLabels

Target = torch.Tensor | SmoothedLabels
VARIANTS = ("jml1", "jml2", "sjl_l1", "sjl_l2")
ACTIVE_MODES = ("PRESENT", "ALL", "LABEL", "PROB", "BOTH")


def is_soft(target: Target) -> bool:
    """True for anything but plain integer hard labels."""
    return isinstance(target, SmoothedLabels) or target.is_floating_point()


def _scatter_bc(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Sum ``values`` (B, H, W) into ``(B, C)`` bins given by ``labels`` (B, H, W) (differentiable in ``values``)."""
    b = labels.shape[0]
    index = labels.reshape(b, -1)
    out = values.new_zeros(b, num_classes)
    return out.scatter_add(1, index, values.reshape(b, -1))


def smoothed_target_statistics(
    probs: torch.Tensor,
    target: SmoothedLabels,
    labels: torch.Tensor,
    keepf: torch.Tensor,
    a: torch.Tensor,
    w: torch.Tensor,
    need_squares: bool = False,
    need_max: str | None = None,
) -> dict[str, torch.Tensor]:
    """The statistics of a smoothed target ``y_ic = a_i + w_i [l_i = c]`` that take no gradient: ``sy`` (and
    ``sy2``), and the maxima of ``need_max`` (``ymax``, ``xmax``, ``xymax``), each ``(B, C)``."""
    b, c = probs.shape[:2]
    with torch.no_grad():
        stats = {"sy": a.sum((1, 2))[:, None] + _scatter_bc(w, labels, c)}
        if need_squares:
            stats["sy2"] = (a * a).sum((1, 2))[:, None] + _scatter_bc(((a + w) ** 2 - a * a) * keepf, labels, c)
        if need_max in ("LABEL", "BOTH"):
            top = (a + w).reshape(b, -1)
            ymax = probs.new_zeros(b, c).scatter_reduce(1, labels.reshape(b, -1), top, "amax")
            stats["ymax"] = torch.maximum(ymax, a.amax((1, 2))[:, None].expand(b, c))
        if need_max in ("PROB", "BOTH"):
            stats["xmax"] = (probs * keepf[:, None]).amax((2, 3))
        if need_max == "BOTH":
            stats["xymax"] = ((probs + target.to_dense()) * keepf[:, None]).amax((2, 3))
    return stats


def class_statistics(
    probs: torch.Tensor,
    target: Target,
    keep: torch.Tensor,
    need_squares: bool = False,
    need_max: str | None = None,
    need_inner: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-image, per-class sums over kept pixels for a smoothed or soft target, each ``(B, C)``.

    Returns ``sx = sum x``, ``sy = sum y``, ``inner = <x, y>``, ``diff = |x - y|_1``; with ``need_squares``
    also ``sx2 = |x|_2^2`` and ``sy2 = |y|_2^2``; with ``need_max`` in ``LABEL``, ``PROB``, ``BOTH`` the matching
    per-class maximum (``ymax``, ``xmax`` or ``xymax``, no gradient). ``need_inner=False`` skips ``<x, y>`` (JML-1
    does not use it). Hard labels go through :func:`hard_statistics`, which fuses the softmax.
    """
    b, c = probs.shape[:2]
    keepf = keep.to(probs.dtype)
    sx = torch.einsum("bchw,bhw->bc", probs, keepf)
    stats: dict[str, torch.Tensor] = {"sx": sx}
    if need_squares:
        stats["sx2"] = torch.einsum("bchw,bhw->bc", probs * probs, keepf)

    if isinstance(target, SmoothedLabels):
        # y_ic = a_i + (1 - e_i)[l_i = c] with a_i = e_i / C.
        labels = torch.where(keep, target.labels, 0)
        x_lab = probs.gather(1, labels[:, None])[:, 0] * keepf
        e = target.eps.to(probs.dtype) * keepf
        a = e / c
        w = (1 - e) * keepf
        if need_inner:
            stats["inner"] = torch.einsum("bchw,bhw->bc", probs, a) + _scatter_bc(w * x_lab, labels, c)
        off = torch.einsum("bchw,bhw->bc", (probs - a[:, None]).abs(), keepf)
        fix = ((x_lab - a - w).abs() - (x_lab - a).abs()) * keepf
        stats["diff"] = off + _scatter_bc(fix, labels, c)
        stats.update(smoothed_target_statistics(probs, target, labels, keepf, a, w, need_squares, need_max))
    else:
        y = target.to(probs.dtype)
        stats["sy"] = torch.einsum("bchw,bhw->bc", y, keepf)
        if need_inner:
            stats["inner"] = torch.einsum("bchw,bhw->bc", probs * y, keepf)
        stats["diff"] = torch.einsum("bchw,bhw->bc", (probs - y).abs(), keepf)
        if need_squares:
            stats["sy2"] = torch.einsum("bchw,bhw->bc", y * y, keepf)
        if need_max is not None:
            with torch.no_grad():
                kf = keepf[:, None]
                if need_max == "LABEL":
                    stats["ymax"] = (y * kf).amax((2, 3))
                elif need_max == "PROB":
                    stats["xmax"] = (probs * kf).amax((2, 3))
                else:
                    stats["xymax"] = ((probs + y) * kf).amax((2, 3))
    return stats


def image_pixels(mask: torch.Tensor) -> list[torch.Tensor]:
    """Flat pixel indices of ``mask`` (B, H, W) per image (a list of B int64 tensors), or ``[]`` where the mask is
    empty: the sparse sets (ignored pixels, BLS boundary pixels) that the fused nodes treat apart."""
    flat = mask.reshape(mask.shape[0], -1)
    counts = flat.sum(1)
    if not bool(counts.any()):
        return []
    return list(flat.nonzero(as_tuple=True)[1].split(counts.tolist()))


def pixel_blocks(pixels: list[torch.Tensor], num_classes: int, elements: int = 1 << 20):
    """``(image, indices)`` pieces of ``pixels`` whose ``(C, piece)`` blocks hold about ``elements`` values (4 MiB in
    float32): gathered with ``index_select`` on an image's ``(C, H * W)`` rows, they stay small and contiguous."""
    step = max(1, elements // max(num_classes, 1))
    for k, idx in enumerate(pixels):
        for part in idx.split(step):
            yield k, part


def kept_sums(flat: torch.Tensor, ignored: list[torch.Tensor], fn=None) -> torch.Tensor:
    """``sum_i keep_i f(p)_ic`` per image and class, ``(B, C)``, from ``flat`` (B, C, N): the sum over every pixel
    (a contiguous reduction, four times faster on CPU than a product with the keep mask) less the ignored pixels'
    part, gathered. ``fn`` maps a ``(B, C, n)`` or ``(C, n)`` block to the values summed (default: the block)."""
    total = (flat if fn is None else fn(flat)).sum(-1)
    for k, idx in pixel_blocks(ignored, flat.shape[1]):
        part = flat[k].index_select(1, idx)
        total[k] -= (part if fn is None else fn(part)).sum(-1)
    return total


def zero_ignored(dz: torch.Tensor, ignored: list[torch.Tensor]) -> torch.Tensor:
    """Zero the gradient ``dz`` (B, C, N) at the ignored pixels, in place."""
    for k, idx in enumerate(ignored):
        dz[k].index_fill_(1, idx, 0.0)
    return dz


def hard_sums(probs: torch.Tensor, labels: torch.Tensor, keepf: torch.Tensor, ignored, need_squares: bool = False):
    """``sx = sum_i keep_i p_ic``, ``inner = sum_{i: l_i = c} keep_i p_ic`` and, with ``need_squares``,
    ``sx2 = sum_i keep_i p_ic^2``, each ``(B, C)``, from probabilities ``(B, C, H, W)``, labels ``(B, H, W)`` and
    the ignored pixels of :func:`image_pixels`; also ``x_lab = keep_i p_{i, l_i}`` (B, N), which the backward pass
    reuses."""
    b, c = probs.shape[:2]
    flat = probs.reshape(b, c, -1)
    sx = kept_sums(flat, ignored)
    lab = labels.reshape(b, 1, -1)
    x_lab = flat.gather(1, lab)[:, 0] * keepf.reshape(b, -1)
    inner = probs.new_zeros(b, c).scatter_add_(1, lab[:, 0], x_lab)
    sx2 = kept_sums(flat, ignored, torch.square) if need_squares else None
    return sx, inner, sx2, x_lab


def hard_sums_backward(probs, labels, x_lab, ignored, g_sx, g_inner, g_sx2=None) -> torch.Tensor:
    """Gradient of :func:`hard_sums` with respect to the logits, ``(B, C, H, W)``, through the softmax:
    ``dz = p * (g - sum_c p_c g_c)`` with ``g_ic = g_sx[c] + 2 p_ic g_sx2[c] + [l_i = c] g_inner[c]`` at kept pixels
    and ``dz = 0`` at ignored ones, built in place (the only new full-size tensor is ``dz``)."""
    b, c = probs.shape[:2]
    flat = probs.reshape(b, c, -1)
    lab = labels.reshape(b, 1, -1)
    p_lab = x_lab.reshape(b, 1, -1)  # p at the label class (0 at ignored pixels, whose gradient is zeroed below)
    g_sx = flat.new_zeros(b, c) if g_sx is None else g_sx
    g_lab = flat.new_zeros(b, 1, lab.shape[-1]) if g_inner is None else g_inner.gather(1, lab[:, 0])[:, None]
    # s_i = sum_c p_ic g_ic, with the sums over classes done as batched matrix products
    s = torch.bmm(g_sx[:, None, :], flat).addcmul_(p_lab, g_lab)
    dz = flat * g_sx[:, :, None]
    if g_sx2 is not None:
        sq = flat * flat
        s.add_(torch.bmm(g_sx2[:, None, :], sq), alpha=2.0)
        dz.addcmul_(sq, g_sx2[:, :, None], value=2.0)
        del sq
    dz.addcmul_(flat, s, value=-1.0)
    dz.scatter_add_(1, lab, p_lab * g_lab)
    return zero_ignored(dz, ignored).view_as(probs)


class _HardStatistics(torch.autograd.Function):
    """Softmax + per-class sums for hard labels in one autograd node (:func:`hard_sums` forward,
    :func:`hard_sums_backward` backward), so the only full-size tensors are ``p`` (saved) and ``dz`` (returned), as
    for cross-entropy."""

    @staticmethod
    def forward(ctx, logits, labels, keepf, ignored, need_squares: bool):
        ctx.set_materialize_grads(False)  # no zero tensor for the gradient of ``probs`` (an output without one)
        probs = logits.softmax(1)
        sx, inner, sx2, x_lab = hard_sums(probs, labels, keepf, ignored, need_squares)
        ctx.save_for_backward(probs, labels, x_lab)
        ctx.ignored, ctx.need_squares = ignored, need_squares
        ctx.mark_non_differentiable(probs)
        return probs, sx, inner, sx2

    @staticmethod
    def backward(ctx, _g_probs, g_sx, g_inner, g_sx2):
        probs, labels, x_lab = ctx.saved_tensors
        g_sx2 = g_sx2 if ctx.need_squares else None
        dz = hard_sums_backward(probs, labels, x_lab, ctx.ignored, g_sx, g_inner, g_sx2)
        return dz, None, None, None, None


def hard_statistics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    keep: torch.Tensor,
    need_squares: bool = False,
    need_max: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Softmax probabilities and the ``(B, C)`` statistics of :func:`class_statistics` for hard labels, through
    one autograd node (no one-hot, no extra full-size tensors in the backward pass)."""
    b, c = logits.shape[:2]
    labels = torch.where(keep, labels, 0)
    keepf = keep.to(logits.dtype)
    probs, sx, inner, sx2 = _HardStatistics.apply(logits, labels, keepf, image_pixels(~keep), need_squares)
    count = _scatter_bc(keepf, labels, c)
    stats = {"sx": sx, "sy": count, "inner": inner, "diff": sx + count - 2 * inner}
    if need_squares:
        stats.update(sx2=sx2, sy2=count)
    if need_max is not None:
        with torch.no_grad():
            stats["ymax"] = (count > 0).to(probs.dtype)
            if need_max in ("PROB", "BOTH"):
                stats["xmax"] = (probs * keepf[:, None]).amax((2, 3))
            if need_max == "BOTH":
                stats["xymax"] = torch.maximum(stats["xmax"], stats["ymax"])
    return probs, stats


def jaccard_from_statistics(
    stats: dict[str, torch.Tensor],
    variant: str = "jml1",
    alpha: float = 1.0,
    beta: float = 1.0,
    smooth: float = 1.0,
    gamma: float = 1.0,
    log_loss: bool = False,
) -> torch.Tensor:
    """Per-class loss from statistics (any leading shape), in the Tversky form of ``docs/losses.md``.

    ``tp`` is ``(|x|_1 + |y|_1 - |x - y|_1) / 2`` for JML-1 (eq. 7) and ``<x, y>`` for JML-2 (eq. 8) and SJL (eq. 2,
    3). The JMLs split the symmetric difference into ``fp = (|x-y|_1 + |x|_1 - |y|_1) / 2`` and
    ``fn = (|x-y|_1 - |x|_1 + |y|_1) / 2`` (the usual fp / fn on hard labels); SJL-L1 uses ``|x|_1 - tp``,
    ``|y|_1 - tp``, SJL-L2 the squared L2 norms. The loss is ``1 - (tp + s) / (tp + alpha fp + beta fn + s)``,
    raised to ``gamma``, or ``-log`` of the ratio with ``log_loss``. ``alpha = beta = 1`` gives eq. 2, 3, 7, 8.
    """
    sx, sy, diff, inner = stats["sx"], stats["sy"], stats["diff"], stats.get("inner")
    if variant in ("jml1", "jml2"):
        tp = (sx + sy - diff) / 2 if variant == "jml1" else inner
        fp = (diff + sx - sy) / 2
        fn = (diff - sx + sy) / 2
    elif variant == "sjl_l1":
        tp, fp, fn = inner, sx - inner, sy - inner
    elif variant == "sjl_l2":
        tp, fp, fn = inner, stats["sx2"] - inner, stats["sy2"] - inner
    else:
        raise ValueError(f"unknown Jaccard variant '{variant}'; choose one of {', '.join(VARIANTS)}")
    den = tp + alpha * fp + beta * fn + smooth
    # x = y = 0 (an empty class without smoothing) is distance 0: ratio 1.
    ratio = torch.where(den > 0, (tp + smooth) / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den))
    if log_loss:
        return -torch.log(ratio.clamp_min(1e-12))
    loss = (1 - ratio).clamp_min(0)
    return loss if gamma == 1 else loss.pow(gamma)


def active_classes(stats: dict[str, torch.Tensor], mode: str, threshold: float = 0.01) -> torch.Tensor:
    """Boolean mask of the classes that take part in the loss (paper section 2.4.2), same shape as the stats."""
    if mode == "PRESENT":
        return stats["sy"] > 0
    if mode == "ALL":
        return torch.ones_like(stats["sy"], dtype=torch.bool)
    if mode == "LABEL":
        return stats["ymax"] > threshold
    if mode == "PROB":
        return stats["xmax"] > threshold
    if mode == "BOTH":
        return stats["xymax"] > threshold
    raise ValueError(f"unknown active_classes '{mode}'; choose one of {', '.join(ACTIVE_MODES)}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None, dim=-1):
    """Weighted mean of ``values`` over ``dim`` where ``mask``; returns ``(mean, any)`` (0 where nothing is kept)."""
    w = mask.to(values.dtype)
    if weights is not None:
        w = w * weights
    total = w.sum(dim)
    return (values * w).sum(dim) / total.clamp_min(1e-12), total > 0


def soft_cross_entropy(logits: torch.Tensor, target: Target, keep: torch.Tensor, class_weights=None) -> torch.Tensor:
    """Mean cross-entropy over kept pixels for hard, smoothed or soft targets (class weights: hard/smoothed only)."""
    n = keep.sum().clamp_min(1)
    if not is_soft(target):
        labels = torch.where(keep, target, 0)
        nll = F.cross_entropy(logits, labels, weight=None, reduction="none")
        if class_weights is not None:
            w = class_weights[labels] * keep
            return (nll * w).sum() / w.sum().clamp_min(1e-12)
        return (nll * keep).sum() / n
    logp = F.log_softmax(logits, dim=1)
    if isinstance(target, SmoothedLabels):
        labels = torch.where(keep, target.labels, 0)
        nll = -logp.gather(1, labels[:, None])[:, 0]
        e = target.eps.to(logp.dtype)
        loss = (1 - e) * nll - e * logp.mean(1)
        if class_weights is not None:
            w = class_weights[labels] * keep
            return (loss * w).sum() / w.sum().clamp_min(1e-12)
        return (loss * keep).sum() / n
    if class_weights is not None:
        raise ValueError("class_weights are not defined for dense soft targets in cross-entropy")
    loss = -(target.to(logp.dtype) * logp).sum(1)
    return (loss * keep).sum() / n


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. errors sorted in decreasing order
    (Berman et al. 2018, eq. 8-9), along the last dimension."""
    gts = gt_sorted.sum(-1, keepdim=True)
    intersection = gts - gt_sorted.cumsum(-1)
    union = gts + (1 - gt_sorted).cumsum(-1)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]], dim=-1)


def lovasz_softmax(
    probs: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, classes: str = "present", chunk: int = 16
):
    """Lovasz-Softmax loss (Berman et al., CVPR 2018) over all kept pixels of the batch; hard labels only.

    Classes are sorted in batches of ``chunk`` (one batched sort per chunk) to bound memory.
    """
    c = probs.shape[1]
    flat_keep = keep.reshape(-1)
    x = probs.transpose(0, 1).reshape(c, -1)[:, flat_keep]  # (C, N), contiguous per class
    y = labels.reshape(-1)[flat_keep]
    if y.numel() == 0:
        return probs.sum() * 0
    candidates = torch.unique(y) if classes == "present" else torch.arange(c, device=y.device)
    losses = []
    for part in candidates.split(chunk):
        fg = (y[None, :] == part[:, None]).to(x.dtype)  # (k, N)
        errors = (fg - x[part]).abs()
        errors_sorted, order = torch.sort(errors, dim=1, descending=True)
        grad = lovasz_grad(fg.gather(1, order))
        losses.append((errors_sorted * grad).sum(1))
    return torch.cat(losses).mean()
