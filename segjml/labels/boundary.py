"""Boundary map of an integer label map (paper section 2.4.1; ``docs/losses.md``).

Pixel ``i`` is a boundary pixel if some pixel ``j`` in its ``k x k`` neighbourhood has ``y_j != y_i``. Ignored pixels
are never boundary pixels, and an ignored neighbour does not make a pixel boundary. The map compares each pixel with
the largest and the smallest valid id in its window, each found separably (``k - 1`` element-wise maxima / minima of
shifted rows, then as many of shifted columns): ``4 (k - 1)`` passes over the ``(B, H, W)`` int32 label map,
O(B * H * W * k), independent of the number of classes (no one-hot).
It is shared by boundary label smoothing and the boundary calibration metrics (BECE, BSCE).
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F


def check_kernel_size(kernel_size: object, name: str = "kernel_size", allow_inf: bool = True) -> int | float:
    """``kernel_size`` as an ``int``, or ``math.inf`` where ``allow_inf``; a one-line ValueError naming it ``name``
    unless it is an odd positive integer (or inf). Text that reads as a number (``"5"``, ``"inf"``) is read as one.

    The one check of a neighbourhood size: the boundary maps, boundary label smoothing and ``loss.bls.kernel_size``.
    """
    number = kernel_size
    if isinstance(kernel_size, str):  # a config value or a command-line override may arrive as text
        try:
            number = float(kernel_size)
        except ValueError:
            pass
    if isinstance(number, Real) and not isinstance(number, bool):
        if number == math.inf and allow_inf:
            return math.inf
        if math.isfinite(number) and float(number).is_integer() and number >= 1 and int(number) % 2 == 1:
            return int(number)
    raise ValueError(f"{name}={kernel_size} must be an odd positive integer{' or inf' if allow_inf else ''}")


def _sliding_extreme(x: torch.Tensor, k: int, fill: int, op) -> torch.Tensor:
    """Max (``op=torch.maximum``) or min over a ``k x k`` window of ``x`` (B, H, W), separably: O(H * W * k)."""
    r = k // 2
    h, w = x.shape[-2:]
    padded = F.pad(x, (r, r, 0, 0), value=fill)
    rows = padded[..., 0:w]
    for d in range(1, k):
        rows = op(rows, padded[..., d : d + w])
    padded = F.pad(rows, (0, 0, r, r), value=fill)
    out = padded[..., 0:h, :]
    for d in range(1, k):
        out = op(out, padded[..., d : d + h, :])
    return out


def boundary_map(label: torch.Tensor, kernel_size: int = 3, ignore_index: int | None = 255) -> torch.Tensor:
    """Boolean ``(B, H, W)`` map of boundary pixels.

    Args:
        label: ``(B, H, W)`` or ``(H, W)`` integer class ids, possibly holding ``ignore_index``.
        kernel_size: odd neighbourhood size ``k``; ``k = 1`` gives no boundary pixels.
        ignore_index: value of ignored pixels (never boundary, never make a neighbour boundary).
    """
    kernel_size = check_kernel_size(kernel_size, allow_inf=False)
    lab = label.to(torch.int32)
    if kernel_size == 1:
        return torch.zeros_like(lab, dtype=torch.bool)
    valid = torch.ones_like(lab, dtype=torch.bool) if ignore_index is None else lab != ignore_index
    # A pixel is boundary iff the largest or the smallest valid id in its window differs from its own id;
    # ignored pixels must win neither extreme (-1 for the max, int32 max for the min).
    big = torch.iinfo(torch.int32).max
    nb_max = _sliding_extreme(lab.masked_fill(~valid, -1), kernel_size, -1, torch.maximum)
    nb_min = _sliding_extreme(lab.masked_fill(~valid, big), kernel_size, big, torch.minimum)
    return ((nb_max > lab) | (nb_min < lab)) & valid


def near_ignore_map(label: torch.Tensor, kernel_size: int = 3, ignore_index: int = 255) -> torch.Tensor:
    """Boolean ``(B, H, W)`` map of pixels whose ``k x k`` window holds an ignored pixel (themselves included).

    The authors' released rule of boundary label smoothing (``strict_ignore``) never makes these pixels boundary
    pixels; they keep their one-hot label and still count in the loss.
    """
    kernel_size = check_kernel_size(kernel_size, allow_inf=False)
    ignored = (label == ignore_index).to(torch.float32)
    squeeze = ignored.ndim == 2
    ignored = ignored[None, None] if squeeze else ignored[:, None]
    out = F.max_pool2d(ignored, kernel_size, stride=1, padding=kernel_size // 2) > 0
    return out[0, 0] if squeeze else out[:, 0]
