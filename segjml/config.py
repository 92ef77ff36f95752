"""Typed schemas for the config groups whose values the loop reads directly.

Registered in Hydra's ConfigStore (``configs/trainer/default.yaml`` extends ``base_trainer``), so a wrong value on
the command line (``trainer.max_iters=abc``) or a misspelt key is refused by Hydra when the config is composed,
before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class EvalConfig:
    mode: str = "whole"
    flip: bool = False
    scales: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class TrainerConfig:
    max_iters: int = 40000
    batch_size: int = 8
    val_batch_size: int = 1
    num_workers: int = 4
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = True
    head_lr_mult: float = 10.0
    no_decay_1d: bool = True
    log_interval: int = 50
    eval_interval: int = 4000
    ckpt_interval: int = 1000
    progress: bool = True
    resume: str | None = None
    skip_nonfinite: bool = False
    limit_train_samples: int | None = None
    limit_val_samples: int | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    extra: dict[str, Any] | None = None


def register_configs() -> None:
    ConfigStore.instance().store(group="trainer", name="base_trainer", node=TrainerConfig)


register_configs()
