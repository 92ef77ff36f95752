"""The mean teacher of JML-SSL: an exponential moving average (EMA) of the student's weights (paper Appendix I, ``T``
of eq. 62-63; AugSeg, Zhao et al., CVPR 2023).

After every optimiser step, ``t <- d * t + (1 - d) * s`` for every parameter and floating-point buffer (BatchNorm's
running mean / var); integer buffers (BatchNorm's ``num_batches_tracked``) are copied. With ``warmup`` the decay of
the update that follows ``n`` earlier updates is ``d_n = min(decay, 1 - 1 / (n + 1))``: 0 on the first update (the
teacher becomes the student), then 1/2, 2/3, ... up to ``decay``; AugSeg's trainer does this with ``decay = 0.999``.
Without ``warmup`` (the default) ``d_n = decay`` and, after ``n`` updates with the student held at ``s``, a parameter
is ``d^n * t_0 + (1 - d^n) * s`` (the closed form the tests check).

The teacher is a deep copy of the student in float32, never trained (``requires_grad=False``, always in eval mode:
BatchNorm normalises with its EMA running statistics and dropout is off, as AugSeg's ``model_teacher.eval()``), never
wrapped in DDP and run under ``torch.no_grad``. The update draws no random numbers and reads only the student's
weights, so ranks that hold identical students hold identical teachers. DDP keeps parameters identical; BatchNorm
running statistics are identical only with SyncBatchNorm (AugSeg uses it; segjml's ``trainer.sync_bn``) or when the
buffers are synchronised before the update.

The update is one fused ``torch._foreach_lerp_`` per (device, dtype) group of float tensors, ``t + (1 - d) (s - t)``
(the same average up to float rounding), not one kernel launch per tensor. timm's ``ModelEmaV3`` has the same
foreach update, and its warm-up ``1 - (1 + n / gamma) ** -power`` is ours with ``gamma = power = 1``; it is not used
because it pairs teacher and student tensors by their position in the state dict (a mismatched student would be
averaged into the wrong tensors instead of refused), and because it is an ``nn.Module`` whose state (``module.*``
keys, the step count kept by the caller) would change the checkpoints' ``ema`` entry.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def _check_unwrapped(student: nn.Module) -> None:
    if isinstance(student, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or hasattr(student, "_orig_mod"):
        raise ValueError(
            f"EMATeacher takes the student without its {type(student).__name__} wrapper: pass "
            "segjml.engine.optim.unwrap_model(model) (the model_without_ddp)"
        )


class EMATeacher:
    """An EMA copy of a student model, used to make the pseudo-labels of the unlabeled images.

    Args:
        student: the student model without DDP / ``torch.compile`` wrappers (``model_without_ddp``); it is copied
            as it is now (AugSeg starts the teacher from the student's initial weights).
        decay: EMA decay ``d`` in ``[0, 1]`` (AugSeg: 0.999).
        warmup: use ``d_n = min(decay, 1 - 1 / (n + 1))`` for the update after ``n`` earlier ones (AugSeg does).

    Attributes:
        model: the teacher module (float32, eval mode, no gradients).
        num_updates: how many updates have been applied (saved in :meth:`state_dict`).
    """

    def __init__(self, student: nn.Module, decay: float = 0.999, warmup: bool = False) -> None:
        _check_unwrapped(student)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay={decay!r} must be a number in [0, 1] (AugSeg uses 0.999)")
        if not isinstance(warmup, bool):
            raise ValueError(f"ema warmup={warmup!r} must be true or false")
        self.decay, self.warmup = float(decay), warmup
        self.model = copy.deepcopy(student).float().eval().requires_grad_(False)
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay the next :meth:`update` applies."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - 1.0 / (self.num_updates + 1))

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """``t <- d * t + (1 - d) * s`` for parameters and float buffers (fused per device and dtype), ``t <- s`` for
        integer buffers.

        Call once after every optimiser step, with the same (unwrapped) student module.
        """
        _check_unwrapped(student)
        d = self.current_decay()
        pairs = (
            (self.model.named_parameters(), student.named_parameters(), "parameter"),
            (self.model.named_buffers(), student.named_buffers(), "buffer"),
        )
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for teacher_items, student_items, kind in pairs:
            teacher_dict, student_dict = dict(teacher_items), dict(student_items)
            if teacher_dict.keys() != student_dict.keys():
                missing = sorted(teacher_dict.keys() ^ student_dict.keys())
                raise ValueError(
                    f"the student's {kind}s do not match the EMA teacher's (e.g. {missing[0]!r}): update the teacher "
                    "with the model it was built from"
                )
            for name, t in teacher_dict.items():
                s = student_dict[name].detach().to(device=t.device, dtype=t.dtype)  # no copy when they agree
                if t.is_floating_point():
                    targets, sources = groups.setdefault((t.device, t.dtype), ([], []))
                    targets.append(t)
                    sources.append(s)
                else:
                    t.copy_(s)
        for targets, sources in groups.values():  # one fused kernel per group: t <- t + (1 - d) (s - t)
            torch._foreach_lerp_(targets, sources, weight=1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def predict(self, images: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The teacher's main-head logits ``(B, C, H, W)`` in float32, in eval mode (BatchNorm on its running
        statistics), without gradients; ``autocast_dtype`` runs the forward under autocast (e.g. ``torch.bfloat16``).
        """
        self.model.eval()
        with torch.autocast(images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            outputs = self.model(images)
        logits = outputs["out"] if isinstance(outputs, Mapping) else outputs
        return logits.float()

    def to(self, device: torch.device | str) -> EMATeacher:
        """Move the teacher to ``device`` (it stays float32)."""
        self.model.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """Teacher weights, the number of updates so far, and the decay settings: all an exact resume needs."""
        return {
            "model": self.model.state_dict(),
            "num_updates": self.num_updates,
            "decay": self.decay,
            "warmup": self.warmup,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the decay settings must match this teacher's (a resumed run continues the
        same schedule)."""
        if state.get("decay") != self.decay or state.get("warmup") != self.warmup:
            raise ValueError(
                f"the saved EMA teacher has decay={state.get('decay')}, warmup={state.get('warmup')} but this run uses "
                f"decay={self.decay}, warmup={self.warmup}; resume with the settings of the saved run"
            )
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
