"""Optimiser parameter groups and the poly learning-rate schedule with linear warmup.

The recipe (encoder at lr, decoder and heads at 10x, no weight decay on 1-d parameters, poly power, warmup) is
described in ``docs/training.md``, section "Learning-rate schedule".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from segjml.models.segmentation_model import check_model_interface


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, head_lr_mult: float = 10.0, no_decay_1d: bool = True
) -> list[dict]:
    """Split parameters into backbone / head groups, each with and without weight decay.

    ``model`` must follow segjml's model interface (:class:`segjml.models.SegmentationModel`; wrappers such as DDP
    are looked through): ``model.encoder_parameters()`` train at ``lr``, ``model.head_parameters()`` (decoder and
    heads) at ``head_lr_mult * lr``. With ``no_decay_1d``, 1-d parameters (norm weights, biases) get no weight decay.
    Every trainable parameter is in exactly one group; the groups come in the order ``head``, ``head_no_decay``,
    ``encoder``, ``encoder_no_decay`` (empty ones left out), parameters in ``model.parameters()`` order. Each group
    stores its ``lr_mult`` so the scheduler can scale it, and its ``name``.

    Raises:
        ValueError: (one line) the model does not follow the interface, or its two parameter lists do not split its
            trainable parameters.
    """
    model = unwrap_model(model)
    check_model_interface(model)
    parts = {"head": _trainable(model.head_parameters()), "encoder": _trainable(model.encoder_parameters())}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    head, encoder = ({id(p) for p in ps} for ps in parts.values())
    both, neither, foreign = head & encoder, trainable - head - encoder, (head | encoder) - trainable
    if both or neither or foreign:
        raise ValueError(
            f"model {type(model).__name__}: encoder_parameters() and head_parameters() must split its "
            f"{len(trainable)} trainable parameters, but {len(both)} are in both, {len(neither)} in neither and "
            f"{len(foreign)} are not trainable parameters of the model"
        )
    groups = []
    for part, mult in (("head", head_lr_mult), ("encoder", 1.0)):
        for no_decay in (False, True):
            params = [p for p in parts[part] if (no_decay_1d and p.ndim <= 1) == no_decay]
            if params:
                groups.append(
                    {
                        "params": params,
                        "lr": lr * mult,
                        "lr_mult": mult,
                        "weight_decay": 0.0 if no_decay else weight_decay,
                        "name": f"{part}{'_no_decay' if no_decay else ''}",
                    }
                )
    return groups


def build_optimizer(
    model: nn.Module,
    optimizer: Callable[..., torch.optim.Optimizer],
    head_lr_mult: float = 10.0,
    no_decay_1d: bool = True,
) -> torch.optim.Optimizer:
    """Call a partially applied optimiser (``_partial_: true`` in ``configs/optimizer``) with the parameter groups.

    ``lr`` and ``weight_decay`` are read from the partial's keywords.
    """
    kw = getattr(optimizer, "keywords", {})
    lr, wd = kw.get("lr", 0.01), kw.get("weight_decay", 0.0)
    return optimizer(param_groups(model, lr, wd, head_lr_mult, no_decay_1d))


class PolyLR(torch.optim.lr_scheduler.LambdaLR):
    """``lr = base * (1 - it / max_iters) ** power`` after a linear warmup from ``warmup_start_lr``.

    During the first ``round(warmup_ratio * max_iters)`` iterations the poly-decayed rate is multiplied by a factor
    rising linearly from ``warmup_start_lr * lr_mult / base`` (capped at 1) to 1, so iteration 0 runs at
    ``warmup_start_lr * lr_mult``. After the warmup the rate is at least ``min_lr``, and ``min_lr`` from
    ``max_iters`` on.

    Args:
        optimizer: the optimiser (its groups' initial ``lr`` are the base rates).
        max_iters: total iterations.
        power: poly exponent (0.9 CNNs, 1.0 transformers).
        warmup_ratio: share of ``max_iters`` spent warming up (0.01).
        warmup_start_lr: learning rate at iteration 0 of the warmup, relative to the group with ``lr_mult = 1``.
        min_lr: floor of the decayed rate.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_iters: int,
        power: float = 0.9,
        warmup_ratio: float = 0.01,
        warmup_start_lr: float = 1e-6,
        min_lr: float = 0.0,
    ) -> None:
        self.max_iters, self.power = max_iters, power
        self.warmup = int(round(warmup_ratio * max_iters))
        bases = [g["lr"] for g in optimizer.param_groups]
        lambdas = [
            self._factor(base, g.get("lr_mult", 1.0), warmup_start_lr, min_lr)
            for base, g in zip(bases, optimizer.param_groups)
        ]
        super().__init__(optimizer, lambdas)

    def _factor(self, base: float, mult: float, start: float, min_lr: float) -> Callable[[int], float]:
        def f(it: int) -> float:
            decay = max(1.0 - min(it, self.max_iters) / self.max_iters, 0.0) ** self.power
            value = max(decay, min_lr / base) if base > 0 else 0.0
            if it < self.warmup:
                s = min(start * mult / base, 1.0) if base > 0 else 1.0
                value *= s + (1 - s) * it / self.warmup
            return value

        return f
