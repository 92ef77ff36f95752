"""Soft-label makers: boundary label smoothing (BLS, paper section 2.4.1), label smoothing, distillation targets.

Smoothed hard labels are kept in a compact form, :class:`SmoothedLabels`: the integer map plus a per-pixel smoothing
coefficient ``eps`` (B, H, W). The dense target ``(1 - eps) * onehot + eps / C`` is never materialised unless asked
for (:meth:`SmoothedLabels.to_dense`); the losses work on the compact form directly, so building a BLS target costs
O(H * W * k^2) whatever the number of classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F

from segjml.labels.boundary import boundary_map, check_kernel_size, near_ignore_map


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_smoothing_eps(eps: object, name: str = "eps") -> None:
    """Raise a one-line ValueError unless ``eps`` is a number in ``[0, 1]``; ``name`` is how the caller calls it."""
    if not _is_number(eps):
        raise ValueError(f"{name}={eps!r} is not a number in [0, 1]")
    if not 0.0 <= eps <= 1.0:  # also refuses NaN
        raise ValueError(f"{name}={eps} is outside [0, 1]")


def check_temperature(temperature: object, name: str = "temperature") -> None:
    """Raise a one-line ValueError unless ``temperature`` is a number > 0."""
    if not _is_number(temperature) or not temperature > 0:  # also refuses NaN
        raise ValueError(f"{name}={temperature} must be a number > 0")


@dataclass
class SmoothedLabels:
    """Hard labels smoothed per pixel: ``y_i = (1 - eps_i) * onehot(labels_i) + eps_i / num_classes``.

    Attributes:
        labels: ``(B, H, W)`` int64 class ids, ``ignore_index`` where ignored.
        eps: ``(B, H, W)`` float smoothing coefficient of every pixel (0 = the one-hot label).
        num_classes: ``C``.
        ignore_index: value of ignored pixels in ``labels``.
    """

    labels: torch.Tensor
    eps: torch.Tensor
    num_classes: int
    ignore_index: int = 255

    def to_dense(self) -> torch.Tensor:
        """The ``(B, C, H, W)`` float target; ignored pixels get all-zero rows."""
        keep = self.labels != self.ignore_index
        onehot = F.one_hot(torch.where(keep, self.labels, 0), self.num_classes).permute(0, 3, 1, 2).to(self.eps.dtype)
        eps = self.eps[:, None]
        return ((1 - eps) * onehot + eps / self.num_classes) * keep[:, None]

    @property
    def shape(self) -> torch.Size:
        b, h, w = self.labels.shape
        return torch.Size((b, self.num_classes, h, w))


def boundary_label_smoothing(
    labels: torch.Tensor,
    num_classes: int,
    eps: float = 0.5,
    kernel_size: int | float = 3,
    ignore_index: int = 255,
    strict_ignore: bool = False,
) -> SmoothedLabels:
    """Boundary label smoothing: smooth only pixels whose ``k x k`` window holds another class.

    Two rules for pixels next to an ignored pixel (``docs/losses.md``); under both, ignored pixels stay ignored,
    every other pixel keeps its label and counts in the loss, and only the boundary map differs:

    - default (``strict_ignore=False``): an ignored neighbour does not make a pixel boundary, but a pixel whose
      window holds another class is boundary even if the window also holds an ignored pixel;
    - ``strict_ignore=True`` (the authors' released rule): a pixel is boundary iff its window holds another class
      and holds no ignored pixel; a pixel whose window touches an ignored pixel keeps its one-hot label.

    Args:
        labels: ``(B, H, W)`` int64 hard labels.
        num_classes: ``C``.
        eps: smoothing coefficient on boundary pixels (paper default 0.5).
        kernel_size: odd ``k`` (paper default 3); ``math.inf`` smooths every kept pixel (plain label smoothing,
            where ``strict_ignore`` has no effect).
        ignore_index: ignored value.
        strict_ignore: the authors' rule above instead of the default.
    """
    check_smoothing_eps(eps)
    kernel_size = check_kernel_size(kernel_size)
    if math.isinf(kernel_size):
        mask = labels != ignore_index
    else:
        mask = boundary_map(labels, kernel_size, ignore_index)
        if strict_ignore:
            mask = mask & ~near_ignore_map(labels, kernel_size, ignore_index)
    return SmoothedLabels(labels, mask.to(torch.get_default_dtype()) * eps, num_classes, ignore_index)


def label_smoothing(
    labels: torch.Tensor, num_classes: int, eps: float = 0.1, ignore_index: int = 255
) -> SmoothedLabels:
    """Plain label smoothing on every pixel (BLS with ``k = inf``)."""
    return boundary_label_smoothing(labels, num_classes, eps, math.inf, ignore_index)


def distillation_targets(
    teacher_logits: torch.Tensor, size: torch.Size | tuple[int, int] | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """Teacher probabilities at ``temperature``, bilinearly resized to the label ``size`` (paper eq. 11-13).

    Args:
        teacher_logits: ``(B, C, h, w)`` logits.
        size: label size ``(H, W)``; ``None`` keeps the logits' size.
        temperature: softmax temperature (1.0 in the paper), > 0.
    """
    check_temperature(temperature)
    if size is not None and tuple(teacher_logits.shape[-2:]) != tuple(size):
        teacher_logits = F.interpolate(teacher_logits, size=size, mode="bilinear", align_corners=False)
    return torch.softmax(teacher_logits.float() / temperature, dim=1)
