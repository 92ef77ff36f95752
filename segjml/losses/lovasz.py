"""Lovasz-Softmax loss: Berman et al., "The Lovasz-Softmax loss", CVPR 2018 (a hard-label baseline, Table 10)."""

from __future__ import annotations

import torch
from torch import nn

from segjml.losses import _functional as Fn
from segjml.losses.validation import autocast_off, check_target, upcast


class LovaszSoftmaxLoss(nn.Module):
    """Lovasz-Softmax on logits and hard labels ``(B, H, W)``. Soft targets are refused: the Lovasz extension is
    not defined for labels inside ``(0, 1)`` (paper section 2.2, Appendix D).

    Args:
        ignore_index: value of ignored pixels.
        classes: ``present`` (classes in the labels) or ``all``.
    """

    def __init__(self, ignore_index: int = 255, classes: str = "present") -> None:
        super().__init__()
        if classes not in ("present", "all"):
            raise ValueError(f"Lovasz classes must be 'present' or 'all', got '{classes}'")
        self.ignore_index, self.classes = ignore_index, classes

    @autocast_off
    def forward(self, logits: torch.Tensor, target: Fn.Target, keep: torch.Tensor | None = None) -> torch.Tensor:
        if Fn.is_soft(target):
            raise ValueError(
                "Lovasz-Softmax needs hard labels (B, H, W) int64; it is undefined for soft labels "
                "(label smoothing, BLS, distillation): use JaccardMetricLoss instead"
            )
        keep = check_target(logits, target, self.ignore_index, keep)
        return Fn.lovasz_softmax(upcast(logits).softmax(1), torch.where(keep, target, 0), keep, self.classes)
