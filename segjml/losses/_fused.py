"""Fused soft-label paths: softmax and the loss sums in one autograd node, for smoothed and dense soft targets.

The plain formula path (softmax, then :func:`segjml.losses._functional.class_statistics` on the dense target) builds
several full-size ``(B, C, H, W)`` temporaries and lets autograd keep them. These nodes compute the same sums and
write only the logits' gradient in the backward pass:

- :func:`smoothed_statistics`: a :class:`~segjml.labels.SmoothedLabels` target ``y_ic = a_i + w_i [l_i = c]``
  (``a = eps / C``, ``w = 1 - eps``) is the hard label everywhere ``eps = 0``. The sums are those of the hard labels
  (:func:`~segjml.losses._functional.hard_sums`) plus a correction computed on the smoothed pixels only (BLS: the
  boundary pixels), gathered image by image in small ``(C, S)`` blocks.
- :func:`soft_statistics`: a dense target ``y`` (teacher probabilities, pseudo-labels): ``sum p``, ``sum |p - y|``,
  ``<p, y>`` in the forward pass, the sign-based gradient in the backward pass; only ``p`` is saved.
- :func:`smoothed_cross_entropy`: CE against a smoothed target with the log-softmax of hard-label CE, the
  smoothing term from the per-pixel mean of ``log p`` and a backward pass of one sweep over ``p``.

Sums over the kept pixels are sums over every pixel less the ignored pixels' part, and the ignored pixels' gradient is
zeroed at the end: on CPU a contiguous reduction is several times faster than a product with the keep mask, and the
ignored pixels are few. Full-size temporaries are what these nodes avoid above all: on CPU a fresh ``(B, C, H, W)``
buffer costs more in page faults than the arithmetic written into it.

Targets get no gradient (they are labels). The formulas are in ``docs/losses.md``.
"""

from __future__ import annotations

import torch

from segjml.labels.soft_labels import SmoothedLabels
from segjml.losses._functional import (
    _scatter_bc,
    hard_sums,
    hard_sums_backward,
    image_pixels,
    kept_sums,
    pixel_blocks,
    smoothed_target_statistics,
    zero_ignored,
)

# Smoothed pixels beyond this share of the kept pixels (plain label smoothing) go through the dense soft node.
SMOOTHED_SHARE_LIMIT = 0.5


class _SmoothedStatistics(torch.autograd.Function):
    """Softmax + the sums of a smoothed target in one node.

    Forward: the hard-label sums ``sx``, ``inner_h``, ``sx2`` over every kept pixel and, on the smoothed pixels
    (gathered image by image as small ``(C, S)`` blocks), the corrections that turn them into the smoothed target's
    sums: ``dcorr_c = sum_S |p - y| - (p + [l = c] - 2 [l = c] p)``, so that
    ``|p - y|_1 = sx + count - 2 inner_h + dcorr``, and ``icorr_c = sum_S p (y - [l = c])``, so that
    ``<p, y> = inner_h + icorr``. Off the label class ``|p - a| - p = max(-a, a - 2p)``; the label class is fixed up
    per pixel. Backward: the hard gradient plus, at the smoothed pixels, the softmax Jacobian applied to the
    corrections' gradient, added block by block into the same buffer. The blocks are kept from the forward pass for
    the backward pass: memory of the smoothed pixels' share of ``p`` (the gather costs as much as the arithmetic).
    """

    @staticmethod
    def forward(ctx, logits, labels, keepf, a, w, pixels, ignored, need_inner: bool, need_squares: bool):
        ctx.set_materialize_grads(False)
        b, c = logits.shape[:2]
        probs = logits.softmax(1)
        sx, inner, sx2, x_lab = hard_sums(probs, labels, keepf, ignored, need_squares)
        dcorr = probs.new_zeros(b, c)
        icorr = probs.new_zeros(b, c) if need_inner else None
        blocks = list(_smoothed_blocks(probs, pixels, labels, x_lab, a, w))
        for k, _, p, lab, p_lab, a_s, w_s in blocks:
            r = torch.sub(a_s, p, alpha=2.0)
            dcorr[k] += torch.maximum(r, -a_s, out=r).sum(1)
            exact = (p_lab - a_s - w_s).abs_() + p_lab - 1
            counted = torch.maximum(a_s - 2 * p_lab, -a_s)
            dcorr[k].index_add_(0, lab, exact - counted)
            if need_inner:
                icorr[k] += torch.mv(p, a_s)
                icorr[k].index_add_(0, lab, p_lab * (w_s - 1))
        # saved tensors (unlike attributes of ctx) are freed as soon as the backward pass is done
        ctx.save_for_backward(probs, labels, x_lab, *[t for block in blocks for t in block[1:]])
        ctx.images, ctx.ignored, ctx.need_squares = [block[0] for block in blocks], ignored, need_squares
        ctx.mark_non_differentiable(probs)
        return probs, sx, inner, sx2, dcorr, icorr

    @staticmethod
    def backward(ctx, _g_probs, g_sx, g_inner, g_sx2, g_dcorr, g_icorr):
        probs, labels, x_lab, *saved = ctx.saved_tensors
        width = len(saved) // max(len(ctx.images), 1)  # tensors per block: indices, p, label, p_label, a, w
        blocks = [(k, *saved[width * i : width * (i + 1)]) for i, k in enumerate(ctx.images)]
        g_sx2 = g_sx2 if ctx.need_squares else None
        dz = hard_sums_backward(probs, labels, x_lab, ctx.ignored, g_sx, g_inner, g_sx2)
        if g_dcorr is None and g_icorr is None:
            return dz, *[None] * 8
        flat = dz.view(probs.shape[0], probs.shape[1], -1)
        for k, idx, p, lab, p_lab, a_s, w_s in blocks:
            # d(corrections) / dp at the block's pixels, (C, S)
            if g_dcorr is not None:
                gd = g_dcorr[k]
                g = torch.lt(p, a_s, out=torch.empty_like(p)).mul_(gd[:, None] * -2.0)  # d max(-a, a - 2p) / dp
                g_lab = gd[lab] * ((p_lab - a_s - w_s).sign() + 1 + 2 * (p_lab < a_s).to(p.dtype))
            else:
                g, g_lab = torch.zeros_like(p), torch.zeros_like(p_lab)
            if g_icorr is not None:
                gi = g_icorr[k]
                g.addr_(gi, a_s)
                g_lab += gi[lab] * (w_s - 1)
            g.scatter_add_(0, lab[None], g_lab[None])
            g.sub_(torch.linalg.vecdot(p, g, dim=0)).mul_(p)
            flat[k].index_add_(1, idx, g)
        return dz, *[None] * 8


def _smoothed_blocks(probs, pixels, labels, x_lab, a, w):
    """``(image, indices, p, label, p_label, a, w)`` on each block of smoothed pixels: ``p`` is ``(C, S)``, the rest
    ``(S,)``."""
    b, c = probs.shape[:2]
    flat = probs.view(b, c, -1)
    labels, a, w = labels.reshape(b, -1), a.reshape(b, -1), w.reshape(b, -1)
    for k, idx in pixel_blocks(pixels, c):
        per_pixel = (v[k].index_select(0, idx) for v in (labels, x_lab, a, w))
        yield k, idx, flat[k].index_select(1, idx), *per_pixel


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
    c = logits.shape[1]
    labels = torch.where(keep, target.labels, 0)
    keepf = keep.to(logits.dtype)
    eps = target.eps.to(logits.dtype) * keepf
    a, w = eps / c, (1 - eps) * keepf
    pixels, ignored = image_pixels((target.eps > 0) & keep), image_pixels(~keep)
    probs, sx, inner_h, sx2, dcorr, icorr = _SmoothedStatistics.apply(
        logits, labels, keepf, a, w, pixels, ignored, need_inner, need_squares
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
    dense target, per image and class over the kept pixels. Backward: ``g = g_sx + sign(p - y) g_diff + y g_inner +
    2 p g_sx2`` per pixel, ``dz = p * (g - sum_c p_c g_c)`` (zero at ignored pixels), written chunk by chunk into the
    buffer that is returned: besides ``p`` (saved) and ``dz``, only chunk-sized temporaries exist."""

    @staticmethod
    def forward(ctx, logits, y, ignored, need_inner: bool, need_squares: bool):
        ctx.set_materialize_grads(False)
        b, c = logits.shape[:2]
        probs = logits.softmax(1)
        flat, yf = probs.reshape(b, c, -1), y.reshape(b, c, -1)
        terms = {"diff": lambda p, q: torch.sub(p, q).abs_()}
        if need_inner:
            terms["inner"] = torch.mul
        if need_squares:
            terms["sx2"] = lambda p, _: p * p
        sums = {key: probs.new_zeros(b, c) for key in terms}
        for part in _chunks(b, c, flat.shape[-1]):
            p, q = flat[:, :, part], yf[:, :, part]
            for key, fn in terms.items():
                sums[key] += fn(p, q).sum(-1)
        for k, idx in pixel_blocks(ignored, c):  # every pixel was summed: take the ignored ones out
            p, q = flat[k].index_select(1, idx), yf[k].index_select(1, idx)
            for key, fn in terms.items():
                sums[key][k] -= fn(p, q).sum(-1)
        ctx.save_for_backward(probs, y)
        ctx.ignored = ignored
        ctx.mark_non_differentiable(probs)
        return probs, kept_sums(flat, ignored), sums["diff"], sums.get("inner"), sums.get("sx2")

    @staticmethod
    def backward(ctx, _g_probs, g_sx, g_diff, g_inner, g_sx2):
        probs, y = ctx.saved_tensors
        b, c = probs.shape[:2]
        flat, yf = probs.reshape(b, c, -1), y.reshape(b, c, -1)
        zero = flat.new_zeros(b, c, 1)
        g_sx = zero if g_sx is None else g_sx[:, :, None]
        g_diff = zero if g_diff is None else g_diff[:, :, None]
        up, down = g_sx + g_diff, g_sx - g_diff
        dz = torch.empty_like(flat)
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
        return zero_ignored(dz, ctx.ignored).view_as(probs), None, None, None, None


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
    b, c = logits.shape[:2]
    y = target.detach().to(logits.dtype)
    ignored = image_pixels(~keep)
    probs, sx, diff, inner, sx2 = _SoftStatistics.apply(logits, y, ignored, need_inner, need_squares)
    stats = {"sx": sx, "diff": diff}
    if need_inner:
        stats["inner"] = inner
    with torch.no_grad():
        yf = y.reshape(b, c, -1)
        stats["sy"] = kept_sums(yf, ignored)
        if need_squares:
            stats["sy2"] = kept_sums(yf, ignored, torch.square)
        if need_max is not None:
            kf = keep.to(logits.dtype)[:, None]
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
    """Mean CE over kept pixels against ``(1 - e) onehot + e / C`` (``e`` zero at ignored pixels):
    ``sum_i (keep_i - e_i) nll_i - e_i mean_c log p_ic``, divided by the kept count. Backward:
    ``dz = keep p - e / C - (keep - e) onehot``, times ``g / n``: one pass over ``p`` and a scatter at the labels,
    whatever the share of smoothed pixels."""

    @staticmethod
    def forward(ctx, logits, labels, keepf, e, n):
        b, c = logits.shape[:2]
        logp = torch.log_softmax(logits, 1)
        nll = -logp.gather(1, labels[:, None])[:, 0]
        total = torch.dot(nll.reshape(-1), (keepf - e).reshape(-1))
        if bool(e.any()):
            mean_logp = torch.bmm(logp.new_full((b, 1, c), 1.0 / c), logp.view(b, c, -1))
            total = total - torch.dot(e.reshape(-1), mean_logp.reshape(-1))
        ctx.save_for_backward(logp, labels, keepf, e)
        ctx.n = n
        return total / n

    @staticmethod
    def backward(ctx, grad):
        logp, labels, keepf, e = ctx.saved_tensors
        b, c = logp.shape[:2]
        scale = grad / ctx.n
        dz = logp.exp().view(b, c, -1)
        torch.addcmul((e * (-scale / c)).view(b, 1, -1), dz, (keepf * scale).view(b, 1, -1), out=dz)
        dz.scatter_add_(1, labels.view(b, 1, -1), ((e - keepf) * scale).view(b, 1, -1))
        return dz.view_as(logp), None, None, None, None


def smoothed_cross_entropy(logits: torch.Tensor, target: SmoothedLabels, keep: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over kept pixels against a smoothed target (BLS or label smoothing), with the cost of
    hard-label CE."""
    labels = torch.where(keep, target.labels, 0)
    keepf = keep.to(logits.dtype)
    e = target.eps.to(logits.dtype) * keepf
    return _SmoothedCrossEntropy.apply(logits, labels, keepf, e, keep.sum().clamp_min(1))


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
) -> torch.Tensor:
    """Mean CE over kept pixels for a smoothed or dense soft target at the cost of hard-label CE: a dense target
    through ``F.cross_entropy``'s probability-target path, a smoothed one through :func:`smoothed_cross_entropy`."""
    if isinstance(target, SmoothedLabels):
        return smoothed_cross_entropy(logits, target, keep)
    target = target.to(logits.dtype)
    if bool(keep.all()):
        return torch.nn.functional.cross_entropy(logits, target)
    per_pixel = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    return torch.dot(per_pixel.reshape(-1), keep.reshape(-1).to(per_pixel.dtype)) / keep.sum().clamp_min(1)
