"""Cheap checks of loss inputs (whole-tensor reductions, no per-pixel Python)."""

from __future__ import annotations

import torch

from segjml.labels.soft_labels import SmoothedLabels


def check_target(logits: torch.Tensor, target, ignore_index: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Validate ``logits`` / ``target`` / ``keep`` and return the ``(B, H, W)`` bool mask of pixels that count.

    Raises:
        ValueError: mismatched shapes, a hard class id outside ``[0, C)`` that is not ``ignore_index``, or a
            non-finite soft target.
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, C, H, W), got shape {tuple(logits.shape)}")
    b, c, h, w = logits.shape
    if isinstance(target, SmoothedLabels):
        if target.num_classes != c:
            raise ValueError(f"smoothed target has {target.num_classes} classes but logits have {c}")
        labels, valid = target.labels, target.labels != ignore_index
    elif target.is_floating_point():
        if tuple(target.shape) != (b, c, h, w):
            raise ValueError(f"soft target shape {tuple(target.shape)} does not match logits shape {(b, c, h, w)}")
        total = target.sum(1)  # one pass: a NaN or an infinity anywhere makes its pixel's sum non-finite
        if not torch.isfinite(total).all():
            raise ValueError("soft target holds NaN or infinite values")
        labels, valid = None, total > 0
    else:
        labels, valid = target, target != ignore_index
    if labels is not None:
        if tuple(labels.shape) != (b, h, w):
            raise ValueError(
                f"target shape {tuple(labels.shape)} does not match logits {(b, c, h, w)}: "
                f"expected (B, H, W) = {(b, h, w)}"
            )
        bad = valid & ((labels < 0) | (labels >= c))
        if bad.any():
            value = int(labels[bad][0])
            raise ValueError(f"target holds class id {value} outside [0, {c}) that is not ignore_index={ignore_index}")
    if keep is not None:
        if tuple(keep.shape) != (b, h, w):
            raise ValueError(f"keep mask shape {tuple(keep.shape)} does not match (B, H, W) = {(b, h, w)}")
        valid = valid & keep.bool()
    return valid


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (AMP) are promoted to float32; float32 and float64 are kept as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
