"""The mean teacher of JML-SSL: an exponential moving average (EMA) of the student's weights (paper Appendix I, ``T``
of eq. 62-63; AugSeg, Zhao et al., CVPR 2023), kept by timm's ``ModelEmaV3``.

After every optimiser step, ``t <- d * t + (1 - d) * s`` for every floating-point entry of the state dict (parameters,
BatchNorm's running mean / var), one fused ``torch._foreach_lerp_``; integer entries (BatchNorm's
``num_batches_tracked``) are copied. With ``warmup`` the decay of the update that follows ``n`` earlier updates is
AugSeg's ``d_n = min(decay, 1 - 1 / (n + 1))``: 0 on the first update (the teacher becomes the student), then 1/2,
2/3, ... up to ``decay`` (AugSeg's trainer uses ``decay = 0.999``). Without ``warmup`` (the default) ``d_n = decay``
and, after ``n`` updates with the student held at ``s``, a parameter is ``d^n * t_0 + (1 - d^n) * s``.

How that maps onto ``ModelEmaV3`` (whose update is the same: floating-point state-dict entries lerped by one foreach
call, the others copied). Its warm-up decay for ``update(model, step)`` is ``1 - (1 + (step - 1) / gamma) ** -power``
(``0`` for ``step <= 1``), capped at ``decay``: with ``gamma = power = 1`` and ``step = n + 1`` (``step`` counts the
update being made, from 1) it is ``1 - 1 / (n + 1)``, AugSeg's schedule (the tests check every step up to 10^5 bit
for bit). Without warm-up the step is not passed: ``ModelEmaV3`` would also return 0 for ``step = 1``, where AugSeg
(and ``warmup=False`` here) use ``decay`` from the first update. What this class adds: the step count
(``num_updates``, saved with the weights), a check that the student's state dict has the teacher's names in the same
order (``ModelEmaV3`` pairs the two by position), ``requires_grad=False`` on the copy, and a state
dict of plain entries (``model``, ``num_updates``, ``decay``, ``warmup``) rather than a module's.

The teacher is a deep copy of the student in float32, never trained, always in eval mode (BatchNorm normalises with
its EMA running statistics and dropout is off, as AugSeg's ``model_teacher.eval()``), never wrapped in DDP and run
under ``torch.no_grad``. The update draws no random numbers and reads only the student's weights, so ranks that hold
identical students hold identical teachers. DDP keeps parameters identical; BatchNorm running statistics are identical
only with SyncBatchNorm (AugSeg uses it; segjml's ``trainer.sync_bn``) or when the buffers are synchronised before the
update.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from timm.utils import ModelEmaV3
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
        ema: the ``timm.utils.ModelEmaV3`` that holds and updates the copy.
        num_updates: how many updates have been applied (saved in :meth:`state_dict`).
    """

    def __init__(self, student: nn.Module, decay: float = 0.999, warmup: bool = False) -> None:
        _check_unwrapped(student)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay={decay!r} must be a number in [0, 1] (AugSeg uses 0.999)")
        if not isinstance(warmup, bool):
            raise ValueError(f"ema warmup={warmup!r} must be true or false")
        self.decay, self.warmup = float(decay), warmup
        # gamma = power = 1: AugSeg's 1 - 1 / (n + 1) (module docstring)
        self.ema = ModelEmaV3(student, self.decay, use_warmup=warmup, warmup_gamma=1.0, warmup_power=1.0)
        self.ema.module.float().eval().requires_grad_(False)
        self.num_updates = 0

    @property
    def model(self) -> nn.Module:
        """The teacher module (float32, eval mode, no gradients)."""
        return self.ema.module

    def _step(self) -> int | None:
        """``ModelEmaV3``'s ``step`` of the next update: its number from 1 with warm-up, none without."""
        return self.num_updates + 1 if self.warmup else None

    def current_decay(self) -> float:
        """The decay the next :meth:`update` applies."""
        return self.ema.get_decay(self._step())

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """``t <- d * t + (1 - d) * s`` for parameters and float buffers (fused), ``t <- s`` for integer buffers.

        Call once after every optimiser step, with the same (unwrapped) student module.
        """
        _check_unwrapped(student)
        # ModelEmaV3 pairs the two state dicts entry by entry: they must hold the same names in the same order
        names, expected = list(student.state_dict()), list(self.model.state_dict())
        if names != expected:
            first = next((a, b) for a, b in zip([*names, None], [*expected, None]) if a != b)
            raise ValueError(
                f"the student's state dict entries do not match the EMA teacher's (student {first[0]!r}, teacher "
                f"{first[1]!r}): update the teacher with the model it was built from"
            )
        self.ema.update(student, step=self._step())
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
