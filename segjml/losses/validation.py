"""Cheap checks of loss inputs (whole-tensor reductions, no per-pixel Python), and the losses' float32 rule."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TypeVar

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


Forward = TypeVar("Forward", bound=Callable)


def autocast_off(forward: Forward) -> Forward:
    """Run a loss module's ``forward(self, logits_or_outputs, ...)`` with autocast off on the logits' device.

    Inside a user's ``torch.autocast`` region the matrix products of the loss sums (``bmm``, ``linalg_vecdot``,
    ``einsum``; on CUDA also ``mv``, ``addr``) would run in half precision next to float32 ops (``dot``), which
    fails or loses the sums' precision. With autocast off and the logits :func:`upcast` at the entry, the loss is the
    float32 loss of the same logit values. Outside autocast this costs two flag checks. The backward pass runs in the
    autocast state of the ``backward()`` call (torch's rule for every op): call it outside the region, as PyTorch
    advises. Devices without autocast (``meta``) run the forward as it is.
    """

    @functools.wraps(forward)
    def run(self, *args, **kwargs):
        inputs: torch.Tensor | Mapping[str, torch.Tensor] = (
            args[0] if args else kwargs.get("logits", kwargs.get("outputs"))
        )
        device = (inputs if torch.is_tensor(inputs) else inputs["out"]).device.type
        if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
            return forward(self, *args, **kwargs)
        with torch.autocast(device, enabled=False):
            return forward(self, *args, **kwargs)

    return run  # type: ignore[return-value]
