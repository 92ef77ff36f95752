"""Cross-entropy for hard, smoothed (BLS / LS) and soft (distillation) targets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segjml.labels.soft_labels import label_smoothing
from segjml.losses import _functional as Fn
from segjml.losses._fused import fused_cross_entropy
from segjml.losses.validation import autocast_off, check_target, upcast


class CrossEntropyLoss(nn.Module):
    """Pixel-wise cross-entropy averaged over kept pixels; ``loss(logits, target, keep=None)`` as in
    :class:`~segjml.losses.JaccardMetricLoss`.

    Args:
        ignore_index: hard-label value of ignored pixels.
        label_smoothing: plain label smoothing applied to hard targets (0 = off).
        class_weights: per-class weights (hard and smoothed targets; these take the formula path).
        fused: smoothed and dense soft targets at the cost of hard-label CE (``_fused.fused_cross_entropy``);
            ``False``: the plain formula path (log-softmax, then the sums), the reference of the tests.
    """

    def __init__(
        self,
        ignore_index: int = 255,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.ignore_index, self.label_smoothing, self.fused = ignore_index, label_smoothing, fused
        weights = None if class_weights is None else torch.as_tensor(list(class_weights), dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)

    @autocast_off
    def forward(self, logits: torch.Tensor, target: Fn.Target, keep: torch.Tensor | None = None) -> torch.Tensor:
        keep = check_target(logits, target, self.ignore_index, keep)
        if self.label_smoothing and not Fn.is_soft(target):
            target = label_smoothing(target, logits.shape[1], self.label_smoothing, self.ignore_index)
        logits = upcast(logits)
        if self.fused and self.class_weights is None and Fn.is_soft(target):
            return fused_cross_entropy(logits, target, keep)
        return Fn.soft_cross_entropy(logits, target, keep, self.class_weights)
