"""Boundary map of an integer label map (paper section 2.4.1; ``shared/spec/REFERENCE.md`` section 2).

Pixel ``i`` is a boundary pixel if some pixel ``j`` in its ``k x k`` neighbourhood has ``y_j != y_i``. Ignored pixels
are never boundary pixels, and an ignored neighbour does not make a pixel boundary. The map is computed with two
max-pools over the ``(B, H, W)`` label map: O(H * W * k^2) and independent of the number of classes (no one-hot).
It is shared by boundary label smoothing and the boundary calibration metrics (BECE, BSCE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_kernel(kernel_size: int) -> None:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"boundary kernel_size must be a positive odd integer, got {kernel_size}")


def boundary_map(label: torch.Tensor, kernel_size: int = 3, ignore_index: int | None = 255) -> torch.Tensor:
    """Boolean ``(B, H, W)`` map of boundary pixels.

    Args:
        label: ``(B, H, W)`` or ``(H, W)`` integer class ids, possibly holding ``ignore_index``.
        kernel_size: odd neighbourhood size ``k``; ``k = 1`` gives no boundary pixels.
        ignore_index: value of ignored pixels (never boundary, never make a neighbour boundary).
    """
    _check_kernel(kernel_size)
    squeeze = label.ndim == 2
    lab = label[None] if squeeze else label
    if kernel_size == 1:
        out = torch.zeros_like(lab, dtype=torch.bool)
        return out[0] if squeeze else out
    lab = lab.to(torch.float32)[:, None]  # class ids < 2**24 are exact in float32
    valid = torch.ones_like(lab, dtype=torch.bool) if ignore_index is None else lab != ignore_index
    # Ignored pixels must not win either pool: -1 for the max, +inf for the min (= -max of the negation).
    high = torch.where(valid, lab, torch.full_like(lab, -1.0))
    low = torch.where(valid, -lab, torch.full_like(lab, -float("inf")))
    pad = kernel_size // 2
    nb_max = F.max_pool2d(high, kernel_size, stride=1, padding=pad)
    nb_min = -F.max_pool2d(low, kernel_size, stride=1, padding=pad)
    out = ((nb_max > lab) | (nb_min < lab)) & valid
    return out[:, 0][0] if squeeze else out[:, 0]


def near_ignore_map(label: torch.Tensor, kernel_size: int = 3, ignore_index: int = 255) -> torch.Tensor:
    """Boolean ``(B, H, W)`` map of pixels whose ``k x k`` window holds an ignored pixel (themselves included).

    The authors' released code drops these pixels from boundary smoothing (the stricter rule).
    """
    _check_kernel(kernel_size)
    ignored = (label == ignore_index).to(torch.float32)
    squeeze = ignored.ndim == 2
    ignored = ignored[None, None] if squeeze else ignored[:, None]
    out = F.max_pool2d(ignored, kernel_size, stride=1, padding=kernel_size // 2) > 0
    return out[0, 0] if squeeze else out[:, 0]
