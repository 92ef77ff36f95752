"""Shared fixtures: compose the Hydra config exactly as ``train.py`` does, forced onto a tiny CPU run."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from segjml.config import CONFIG_DIR, compose

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """Compose ``configs/train.yaml`` with ``overrides`` as ``train.py`` would, output in ``output_dir``."""
    return compose(overrides, output_dir=output_dir)


def group_options(group: str) -> list[str]:
    """Every option (file stem) of a config group."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))

