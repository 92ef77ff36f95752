"""Fused soft-label paths: softmax and the loss sums in one autograd node, for smoothed and dense soft targets.

The plain formula path (softmax, then :func:`segjml.losses._functional.class_statistics` on the dense target) builds
several full-size ``(B, C, H, W)`` temporaries and lets autograd keep them. These nodes compute the same sums and
write only the logits' gradient in the backward pass:

- :func:`smoothed_statistics`: a :class:`~segjml.labels.SmoothedLabels` target ``y_ic = a_i + w_i [l_i = c]``
  (``a = eps / C``, ``w = 1 - eps``) is the hard label everywhere ``eps = 0``. The sums are those of the hard labels
  (:func:`~segjml.losses._functional.hard_sums`) plus a correction computed on the smoothed pixels only (BLS: the
  boundary pixels), gathered as a ``(S, C)`` block.
- :func:`soft_statistics`: a dense target ``y`` (teacher probabilities, pseudo-labels): ``sum p``, ``sum |p - y|``,
  ``<p, y>`` in the forward pass, the sign-based gradient in the backward pass; only ``p`` is saved.
- :func:`smoothed_cross_entropy`: CE against a smoothed target with the log-softmax of hard-label CE and the
  smoothing term on the smoothed pixels only.

Targets get no gradient (they are labels). The formulas are in ``docs/losses.md``.
"""

from __future__ import annotations

import torch

from segjml.labels.soft_labels import SmoothedLabels
from segjml.losses._functional import _scatter_bc, hard_sums, hard_sums_backward, smoothed_target_statistics

# Smoothed pixels beyond this share of the kept pixels (plain label smoothing) go through the dense soft node.
SMOOTHED_SHARE_LIMIT = 0.5


def smoothed_pixels(target: SmoothedLabels, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch and flat pixel indices ``(S,)`` of the kept pixels with ``eps > 0``."""
    b = keep.shape[0]
    mask = (target.eps > 0) & keep
    bi, ni = mask.reshape(b, -1).nonzero(as_tuple=True)
    return bi, ni


class _SmoothedStatistics(torch.autograd.Function):
    """Softmax + the sums of a smoothed target in one node.

    Forward: the hard-label sums ``sx``, ``inner_h``, ``sx2`` over every kept pixel and, on the smoothed pixels
    ``S`` (as an ``(S, C)`` block), the corrections that turn them into the smoothed target's sums:
    ``dcorr_c = sum_S |p - y| - (p + [l = c] - 2 [l = c] p)``, so that ``|p - y|_1 = sx + count - 2 inner_h + dcorr``,
    and ``icorr_c = sum_S p (y - [l = c])``, so that ``<p, y> = inner_h + icorr``. Off the label class
    ``|p - a| - p = max(-a, a - 2p)``; the label class is fixed up per pixel. Backward: the hard gradient plus, at the
    smoothed pixels, the softmax Jacobian applied to the corrections' gradient, scattered into the same buffer.
    """

    @staticmethod
    def forward(ctx, logits, labels, keepf, a, w, bi, ni, need_inner: bool, need_squares: bool):
        b, c = logits.shape[:2]
        probs = logits.softmax(1)
        sx, inner, sx2 = hard_sums(probs, labels, keepf, need_squares)
        p = probs.view(b, c, -1).transpose(1, 2)[bi, ni]  # (S, C)
        lab = labels.view(b, -1)[bi, ni][:, None]  # (S, 1)
        p_lab = p.gather(1, lab)
        a_s = a.view(b, -1)[bi, ni][:, None]
        w_s = w.view(b, -1)[bi, ni][:, None]
        r = torch.add(a_s, p, alpha=-2.0)
        r = torch.maximum(r, -a_s, out=r)
        dcorr = probs.new_zeros(b, c).index_add_(0, bi, r)
        exact = (p_lab - a_s - w_s).abs() + p_lab - 1
        counted = torch.maximum(a_s - 2 * p_lab, -a_s)
        dcorr.index_put_((bi, lab[:, 0]), (exact - counted)[:, 0], accumulate=True)
        icorr = None
        if need_inner:
            icorr = probs.new_zeros(b, c).index_add_(0, bi, p * a_s)
            icorr.index_put_((bi, lab[:, 0]), (p_lab * (w_s - 1))[:, 0], accumulate=True)
        ctx.save_for_backward(probs, labels, keepf, p, lab, a_s, w_s, bi, ni)
        ctx.need_squares = need_squares
        ctx.mark_non_differentiable(probs)
        return probs, sx, inner, sx2, dcorr, icorr

    @staticmethod
    def backward(ctx, _g_probs, g_sx, g_inner, g_sx2, g_dcorr, g_icorr):
        probs, labels, keepf, p, lab, a_s, w_s, bi, ni = ctx.saved_tensors
        b, c = probs.shape[:2]
        dz = hard_sums_backward(probs, labels, keepf, g_sx, g_inner, g_sx2 if ctx.need_squares else None)
        if (g_dcorr is None and g_icorr is None) or bi.numel() == 0:
            return dz, None, None, None, None, None, None, None, None
        p_lab = p.gather(1, lab)
        g = torch.zeros_like(p)
        g_lab = torch.zeros_like(p_lab)
        if g_dcorr is not None:
            rows = g_dcorr[bi]  # (S, C)
            g.addcmul_(rows, (p < a_s).to(p.dtype), value=-2.0)  # d max(-a, a - 2p) / dp
            d_lab = (p_lab - a_s - w_s).sign() + 1 + 2 * (p_lab < a_s).to(p.dtype)
            g_lab += rows.gather(1, lab) * d_lab
        if g_icorr is not None:
            rows = g_icorr[bi]
            g.addcmul_(rows, a_s)
            g_lab += rows.gather(1, lab) * (w_s - 1)
        g.scatter_add_(1, lab, g_lab)
        dzs = g.sub_((p * g).sum(1, keepdim=True)).mul_(p)
        dz.view(b, c, -1).transpose(1, 2).index_put_((bi, ni), dzs, accumulate=True)
        return dz, None, None, None, None, None, None, None, None


def smoothed_statistics(
    logits: torch.Tensor,
    target: SmoothedLabels,
    keep: torch.Tensor,
    need_squares: bool = False,
    need_max: str | None = None,
    need_inner: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Softmax probabilities and the ``(B, C)`` statistics of ``class_statistics`` for a smoothed target, through
    one autograd node; no dense target is built (except for ``need_max="BOTH"``, whose maximum needs it)."""
    b, c = logits.shape[:2]
    labels = torch.where(keep, target.labels, 0)
    keepf = keep.to(logits.dtype)
    eps = target.eps.to(logits.dtype) * keepf
    a, w = eps / c, (1 - eps) * keepf
    bi, ni = smoothed_pixels(target, keep)
    probs, sx, inner_h, sx2, dcorr, icorr = _SmoothedStatistics.apply(
        logits, labels, keepf, a, w, bi, ni, need_inner, need_squares
    )
    count = _scatter_bc(keepf, labels, c)
    stats = {"sx": sx, "diff": sx + count - 2 * inner_h + dcorr}
    if need_inner:
        stats["inner"] = inner_h + icorr
    if need_squares:
        stats["sx2"] = sx2
    stats.update(smoothed_target_statistics(probs, target, labels, keepf, a, w, need_squares, need_max))
    return probs, stats


def _chunks(b: int, c: int, n: int, elements: int = 1 << 22) -> list[slice]:
    """Pixel ranges whose ``(B, C, chunk)`` blocks hold about ``elements`` values (16 MiB in float32): the
    temporaries of the dense node stay that small whatever the batch and image size."""
    step = max(1, elements // max(b * c, 1))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


class _SoftStatistics(torch.autograd.Function):
    """Softmax + ``sx = sum p``, ``diff = sum |p - y|``, optionally ``inner = <p, y>`` and ``sx2 = sum p^2`` against a
    dense target, per image and class. Backward: ``g = g_sx + sign(p - y) g_diff + y g_inner + 2 p g_sx2`` per pixel,
    ``dz = keep * p * (g - sum_c p_c g_c)``, written chunk by chunk into the buffer that is returned: besides ``p``
    (saved) and ``dz``, only chunk-sized temporaries exist."""

    @staticmethod
    def forward(ctx, logits, y, keepf, need_inner: bool, need_squares: bool):
        b, c = logits.shape[:2]
        probs = logits.softmax(1)
        flat, yf, kf = probs.reshape(b, c, -1), y.reshape(b, c, -1), keepf.reshape(b, -1, 1)
        sx = torch.bmm(flat, kf)[..., 0]
        diff = probs.new_zeros(b, c)
        inner = probs.new_zeros(b, c) if need_inner else None
        sx2 = probs.new_zeros(b, c) if need_squares else None
        for part in _chunks(b, c, flat.shape[-1]):
            p, q, k = flat[:, :, part], yf[:, :, part], kf[:, part]
            diff.add_(torch.bmm(torch.sub(p, q).abs_(), k)[..., 0])
            if need_inner:
                inner.add_(torch.bmm(p * q, k)[..., 0])
            if need_squares:
                sx2.add_(torch.bmm(p * p, k)[..., 0])
        ctx.save_for_backward(probs, y, keepf)
        ctx.mark_non_differentiable(probs)
        return probs, sx, diff, inner, sx2

    @staticmethod
    def backward(ctx, _g_probs, g_sx, g_diff, g_inner, g_sx2):
        probs, y, keepf = ctx.saved_tensors
        b, c = probs.shape[:2]
        flat, yf, kf = probs.reshape(b, c, -1), y.reshape(b, c, -1), keepf.reshape(b, 1, -1)
        zero = flat.new_zeros(b, c, 1)
        g_sx = zero if g_sx is None else g_sx[:, :, None]
        g_diff = zero if g_diff is None else g_diff[:, :, None]
        up, down = g_sx + g_diff, g_sx - g_diff
        dz = torch.empty_like(flat)
        masked = not bool(keepf.all())
        for part in _chunks(b, c, flat.shape[-1]):
            p, q = flat[:, :, part], yf[:, :, part]
            # g_sx + sign(p - y) g_diff (p = y, a tie of measure zero, takes the p < y side)
            g = torch.where(p > q, up, down)
            if g_inner is not None:
                g.addcmul_(q, g_inner[:, :, None])
            if g_sx2 is not None:
                g.addcmul_(p, g_sx2[:, :, None], value=2.0)
            s = torch.linalg.vecdot(p, g, dim=1)[:, None]  # (B, 1, chunk)
            torch.mul(g.sub_(s), p, out=dz[:, :, part])  # a strided view of the buffer: written in place
            if masked:
                dz[:, :, part].mul_(kf[:, :, part])
        return dz.view_as(probs), None, None, None, None


def soft_statistics(
    logits: torch.Tensor,
    target: torch.Tensor,
    keep: torch.Tensor,
    need_squares: bool = False,
    need_max: str | None = None,
    need_inner: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Softmax probabilities and the ``(B, C)`` statistics of ``class_statistics`` for a dense soft target
    ``(B, C, H, W)`` (no gradient flows to the target), through one autograd node."""
    keepf = keep.to(logits.dtype)
    y = target.detach().to(logits.dtype)
    probs, sx, diff, inner, sx2 = _SoftStatistics.apply(logits, y, keepf, need_inner, need_squares)
    stats = {"sx": sx, "diff": diff}
    if need_inner:
        stats["inner"] = inner
    with torch.no_grad():
        stats["sy"] = torch.einsum("bchw,bhw->bc", y, keepf)
        if need_squares:
            stats["sy2"] = torch.einsum("bchw,bhw->bc", y * y, keepf)
        if need_max is not None:
            kf = keepf[:, None]
            if need_max == "LABEL":
                stats["ymax"] = (y * kf).amax((2, 3))
            elif need_max == "PROB":
                stats["xmax"] = (probs * kf).amax((2, 3))
            else:
                stats["xymax"] = ((probs + y) * kf).amax((2, 3))
    if need_squares:
        stats["sx2"] = sx2
    return probs, stats


class _SmoothedCrossEntropy(torch.autograd.Function):
    """Mean CE over kept pixels against ``(1 - e) onehot + e / C``:
    ``sum_i keep_i nll_i - sum_S e (nll + mean_c log p)``, divided by the kept count. Backward:
    ``dz = keep (p - onehot) + e (onehot - 1 / C)`` on the smoothed pixels, times ``g / n``."""

    @staticmethod
    def forward(ctx, logits, labels, keepf, eps, bi, ni, n):
        b, c = logits.shape[:2]
        logp = torch.log_softmax(logits, 1)
        nll = -logp.gather(1, labels[:, None])[:, 0]
        total = torch.dot(nll.reshape(-1), keepf.reshape(-1))
        if bi.numel():
            lp = logp.view(b, c, -1).transpose(1, 2)[bi, ni]
            e = eps.reshape(b, -1)[bi, ni]
            total = total - torch.dot(e, nll.reshape(b, -1)[bi, ni] + lp.mean(1))
        ctx.save_for_backward(logp, labels, keepf, eps, bi, ni)
        ctx.n = n
        return total / n

    @staticmethod
    def backward(ctx, grad):
        logp, labels, keepf, eps, bi, ni = ctx.saved_tensors
        b, c = logp.shape[:2]
        scale = grad / ctx.n
        dz = logp.exp()
        dz.mul_(keepf[:, None] * scale)
        dz.scatter_add_(1, labels[:, None], -(keepf * scale)[:, None])
        if bi.numel():
            e = eps.reshape(b, -1)[bi, ni] * scale
            lab = labels.reshape(b, -1)[bi, ni]
            rows = (-e / c)[:, None].expand(-1, c).clone().scatter_add_(1, lab[:, None], e[:, None])
            dz.view(b, c, -1).transpose(1, 2).index_put_((bi, ni), rows, accumulate=True)
        return dz, None, None, None, None, None, None


def smoothed_cross_entropy(logits: torch.Tensor, target: SmoothedLabels, keep: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over kept pixels against a smoothed target, with the cost of hard-label CE."""
    labels = torch.where(keep, target.labels, 0)
    keepf = keep.to(logits.dtype)
    eps = target.eps.to(logits.dtype) * keepf
    bi, ni = smoothed_pixels(target, keep)
    return _SmoothedCrossEntropy.apply(logits, labels, keepf, eps, bi, ni, keep.sum().clamp_min(1))


def fused_statistics(
    logits: torch.Tensor,
    target: torch.Tensor | SmoothedLabels,
    keep: torch.Tensor,
    need_squares: bool = False,
    need_max: str | None = None,
    need_inner: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`smoothed_statistics` for a smoothed target whose smoothed pixels are few (BLS), else
    :func:`soft_statistics` (a dense target, or label smoothing on every pixel)."""
    if isinstance(target, SmoothedLabels):
        share = ((target.eps > 0) & keep).sum() / keep.sum().clamp_min(1)
        if share <= SMOOTHED_SHARE_LIMIT:
            return smoothed_statistics(logits, target, keep, need_squares, need_max, need_inner)
        target = target.to_dense().to(logits.dtype)
    return soft_statistics(logits, target, keep, need_squares, need_max, need_inner)


def fused_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor | SmoothedLabels, keep: torch.Tensor
) -> torch.Tensor | None:
    """Mean CE over kept pixels for a smoothed or dense soft target at the cost of hard-label CE, or ``None`` where
    no fused form applies (label smoothing whose ``eps`` varies over many pixels).

    A dense target goes through ``F.cross_entropy``'s probability-target path; label smoothing with one ``eps``
    through its ``label_smoothing`` argument; boundary label smoothing through :func:`smoothed_cross_entropy`.
    """
    n = keep.sum().clamp_min(1)
    if not isinstance(target, SmoothedLabels):
        per_pixel = torch.nn.functional.cross_entropy(logits, target.to(logits.dtype), reduction="none")
        return torch.dot(per_pixel.reshape(-1), keep.reshape(-1).to(per_pixel.dtype)) / n
    smoothed = (target.eps > 0) & keep
    if smoothed.sum() <= SMOOTHED_SHARE_LIMIT * n:
        return smoothed_cross_entropy(logits, target, keep)
    eps = target.eps[keep]
    if bool((eps == eps[0]).all()):  # plain label smoothing: one eps on every kept pixel
        labels = torch.where(keep, target.labels, -100)
        per_pixel = torch.nn.functional.cross_entropy(logits, labels, reduction="none", label_smoothing=float(eps[0]))
        return per_pixel.sum() / n
    return None
