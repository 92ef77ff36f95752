"""Optimiser parameter groups and the poly learning-rate schedule with linear warmup (``REFERENCE.md`` section 5)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def param_groups(model: nn.Module, lr: float, weight_decay: float, head_lr_mult: float = 10.0,
                 no_decay_1d: bool = True) -> list[dict]:
    """Split parameters into backbone / head groups, each with and without weight decay.

    The encoder (``model.encoder``) trains at ``lr``; decoder and heads at ``head_lr_mult * lr``. With
    ``no_decay_1d``, 1-d parameters (norm weights, biases) get no weight decay. Every trainable parameter is in
    exactly one group. Each group stores its ``lr_mult`` so the scheduler can scale it.
    """
    encoder_ids = {id(p) for p in model.encoder.parameters()} if hasattr(model, "encoder") else set()
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        key = (id(p) in encoder_ids, no_decay_1d and p.ndim <= 1)
        buckets.setdefault(key, []).append(p)
    groups = []
    for (is_encoder, no_decay), params in sorted(buckets.items()):
        mult = 1.0 if is_encoder else head_lr_mult
        groups.append({"params": params, "lr": lr * mult, "lr_mult": mult,
                       "weight_decay": 0.0 if no_decay else weight_decay,
                       "name": f"{'encoder' if is_encoder else 'head'}{'_no_decay' if no_decay else ''}"})
    return groups


def build_optimizer(model: nn.Module, optimizer: Callable[..., torch.optim.Optimizer], head_lr_mult: float = 10.0,
                    no_decay_1d: bool = True) -> torch.optim.Optimizer:
    """Call a partially applied optimiser (``_partial_: true`` in ``configs/optimizer``) with the parameter groups.

    ``lr`` and ``weight_decay`` are read from the partial's keywords.
    """
    kw = getattr(optimizer, "keywords", {})
    lr, wd = kw.get("lr", 0.01), kw.get("weight_decay", 0.0)
    return optimizer(param_groups(model, lr, wd, head_lr_mult, no_decay_1d))


class PolyLR(torch.optim.lr_scheduler.LambdaLR):
    """``lr = base * (1 - it / max_iters) ** power`` after a linear warmup from ``warmup_start_lr``.

    Args:
        optimizer: the optimiser (its groups' initial ``lr`` are the base rates).
        max_iters: total iterations.
        power: poly exponent (0.9 CNNs, 1.0 transformers).
        warmup_ratio: share of ``max_iters`` spent warming up (0.01).
        warmup_start_lr: learning rate at iteration 0 of the warmup, relative to the group with ``lr_mult = 1``.
        min_lr: floor of the decayed rate.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_iters: int, power: float = 0.9,
                 warmup_ratio: float = 0.01, warmup_start_lr: float = 1e-6, min_lr: float = 0.0) -> None:
        self.max_iters, self.power = max_iters, power
        self.warmup = int(round(warmup_ratio * max_iters))
        bases = [g["lr"] for g in optimizer.param_groups]
        lambdas = [self._factor(base, g.get("lr_mult", 1.0), warmup_start_lr, min_lr)
                   for base, g in zip(bases, optimizer.param_groups)]
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


def count_parameters(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
