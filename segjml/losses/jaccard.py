"""Jaccard metric losses (paper section 2.3, eq. 7-8) and the soft Jaccard baselines (eq. 2-3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segjml.labels.soft_labels import SmoothedLabels
from segjml.losses import _functional as Fn
from segjml.losses._fused import fused_statistics
from segjml.losses.validation import autocast_off, check_target, upcast

CLASS_WEIGHTS_MODES = ("scaled", "normalized")


class JaccardMetricLoss(nn.Module):
    """Jaccard metric loss on logits with hard, smoothed or soft targets.

    ``loss(logits, target, keep=None)``: ``logits`` (B, C, H, W); ``target`` hard ``(B, H, W)`` int64 (may hold
    ``ignore_index``), :class:`~segjml.labels.SmoothedLabels`, or soft ``(B, C, H, W)`` float; ``keep`` an optional
    ``(B, H, W)`` bool mask of pixels that count. Returns a scalar.

    Args:
        variant: ``jml1`` (eq. 7, default), ``jml2`` (eq. 8), ``sjl_l1`` (eq. 2), ``sjl_l2`` (eq. 3).
        alpha, beta: Tversky weights of false positives / negatives (0.5 / 0.5 = Dice semimetric loss).
        gamma: focal exponent applied to the per-class loss.
        log_loss: use ``-log(ratio)`` instead of ``1 - ratio``.
        smooth: added to numerator and denominator (keeps empty classes finite).
        class_weights: per-class weights ``w_c`` applied as ``class_weights_mode`` says.
        class_weights_mode: ``scaled`` (default, the authors' form): each class loss is multiplied by ``w_c``, then the
            plain mean over the active classes is taken, ``sum_A w_c l_c / |A|``; ``normalized``: the weighted
            mean ``sum_A w_c l_c / sum_A w_c`` (formulas in ``docs/losses.md``).
        ignore_index: hard-label value of ignored pixels.
        active_classes: ``PRESENT``, ``ALL``, ``LABEL``, ``PROB``, ``BOTH``; ``None`` picks ``active_classes_hard``
            for hard targets and ``active_classes_soft`` for soft ones.
        threshold: confidence threshold of ``LABEL`` / ``PROB`` / ``BOTH``.
        miou_d, miou_i, miou_c: weights of the dataset-level, per-image and per-class losses (section 6.1).
        sync_stats: under ``torch.distributed``, all-reduce the per-class statistics (differentiably) so that the
            dataset-level loss is computed over the global batch.
        fused: compute softmax and the sums in one autograd node (hard, smoothed and dense soft targets);
            ``False`` takes the plain formula path (softmax, then sums against the dense target), slower and
            heavier, kept as the reference the fused paths are tested against.
    """

    def __init__(
        self,
        variant: str = "jml1",
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        log_loss: bool = False,
        smooth: float = 1.0,
        class_weights: Sequence[float] | None = None,
        class_weights_mode: str = "scaled",
        ignore_index: int = 255,
        active_classes: str | None = None,
        active_classes_hard: str = "PRESENT",
        active_classes_soft: str = "ALL",
        threshold: float = 0.01,
        miou_d: float = 1.0,
        miou_i: float = 0.0,
        miou_c: float = 0.0,
        sync_stats: bool = False,
        fused: bool = True,
    ) -> None:
        super().__init__()
        if variant not in Fn.VARIANTS:
            raise ValueError(f"unknown Jaccard variant '{variant}'; choose one of {', '.join(Fn.VARIANTS)}")
        for mode in (active_classes, active_classes_hard, active_classes_soft):
            if mode is not None and mode not in Fn.ACTIVE_MODES:
                raise ValueError(f"unknown active_classes '{mode}'; choose one of {', '.join(Fn.ACTIVE_MODES)}")
        self.variant, self.alpha, self.beta, self.gamma, self.log_loss = variant, alpha, beta, gamma, log_loss
        self.smooth, self.ignore_index, self.threshold = smooth, ignore_index, threshold
        self.active_classes = active_classes
        self.active_hard, self.active_soft = active_classes_hard, active_classes_soft
        self.miou_d, self.miou_i, self.miou_c, self.sync_stats = miou_d, miou_i, miou_c, sync_stats
        self.fused = fused
        if class_weights_mode not in CLASS_WEIGHTS_MODES:
            raise ValueError(
                f"unknown class_weights_mode {class_weights_mode!r}; choose 'scaled' (each class loss times its "
                "weight, plain mean over active classes) or 'normalized' (weighted mean)"
            )
        self.class_weights_mode = class_weights_mode
        weights = None if class_weights is None else torch.as_tensor(list(class_weights), dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)

    @autocast_off
    def forward(self, logits: torch.Tensor, target: Fn.Target, keep: torch.Tensor | None = None) -> torch.Tensor:
        keep = check_target(logits, target, self.ignore_index, keep)
        if self.class_weights is not None and self.class_weights.numel() != logits.shape[1]:
            raise ValueError(
                f"class_weights has {self.class_weights.numel()} entries but logits have {logits.shape[1]} classes"
            )
        mode = self.active_classes or (self.active_soft if Fn.is_soft(target) else self.active_hard)
        need_max = mode if mode in ("LABEL", "PROB", "BOTH") else None
        sums = {"need_squares": self.variant == "sjl_l2", "need_max": need_max, "need_inner": self.variant != "jml1"}
        if not self.fused:  # the plain formula path: softmax, then the sums against the dense target
            probs = upcast(logits).softmax(dim=1)
            stats = Fn.class_statistics(probs, dense_target(target, logits.shape[1], keep, probs.dtype), keep, **sums)
        elif Fn.is_soft(target) and not (torch.is_tensor(target) and target.requires_grad):
            probs, stats = fused_statistics(upcast(logits), target, keep, **sums)
        elif Fn.is_soft(target):  # a target that takes gradients (e.g. a learned one): autograd through the formula
            probs = upcast(logits).softmax(dim=1)
            stats = Fn.class_statistics(probs, target, keep, **sums)
        else:
            probs, stats = Fn.hard_statistics(upcast(logits), target, keep, sums["need_squares"], need_max)
        loss_args = (self.variant, self.alpha, self.beta, self.smooth, self.gamma, self.log_loss)
        # scaled: w_c multiplies each class loss (below) and the class averages are plain means; normalized: the
        # class averages are means weighted by w_c
        weights = self.class_weights
        scale = weights is not None and self.class_weights_mode == "scaled"
        if scale:
            weights = None
        total = probs.new_zeros(())
        if self.miou_d:
            batch = {k: v.sum(0) for k, v in stats.items() if not k.endswith("max")}
            batch.update({k: v.amax(0) for k, v in stats.items() if k.endswith("max")})
            if self.sync_stats:
                batch = _all_reduce_stats(batch)
            per_class = Fn.jaccard_from_statistics(batch, *loss_args)
            if scale:
                per_class = per_class * self.class_weights
            value, _ = Fn.masked_mean(per_class, Fn.active_classes(batch, mode, self.threshold), weights)
            total = total + self.miou_d * value
        if self.miou_i or self.miou_c:
            per_image_class = Fn.jaccard_from_statistics(stats, *loss_args)
            if scale:
                per_image_class = per_image_class * self.class_weights
            active = Fn.active_classes(stats, mode, self.threshold)
            if self.miou_i:  # average over each image's active classes, then over images that have any
                per_image, has_any = Fn.masked_mean(per_image_class, active, weights, dim=1)
                value, _ = Fn.masked_mean(per_image, has_any, dim=0)
                total = total + self.miou_i * value
            if self.miou_c:  # average each class over the images where it is active, then over classes
                per_class, has_any = Fn.masked_mean(per_image_class, active, dim=0)
                value, _ = Fn.masked_mean(per_class, has_any, weights)
                total = total + self.miou_c * value
        return total


def _all_reduce_stats(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return stats
    from torch.distributed.nn.functional import all_reduce

    out = {}
    for key, value in stats.items():
        if key.endswith("max"):
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            out[key] = value
        else:
            out[key] = all_reduce(value)  # differentiable sum
    return out


def dense_target(target: Fn.Target, num_classes: int, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Any target as a dense ``(B, C, H, W)`` distribution (zero rows where not kept): the formula path's input."""
    if isinstance(target, SmoothedLabels):
        return target.to_dense().to(dtype) * keep[:, None]
    if target.is_floating_point():
        return target.to(dtype) * keep[:, None]
    onehot = torch.nn.functional.one_hot(torch.where(keep, target, 0), num_classes).permute(0, 3, 1, 2)
    return onehot.to(dtype) * keep[:, None]
