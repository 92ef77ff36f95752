"""Shared fixtures: compose the Hydra config exactly as ``train.py`` does, forced onto a tiny CPU run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import segjml.config  # noqa: F401  (registers the typed config schemas)

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"

torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """Compose ``configs/train.yaml`` with ``overrides`` (+ ``debug=fast``), output in ``output_dir``."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def group_options(group: str) -> list[str]:
    """Every option (file stem) of a config group."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*overrides: str) -> DictConfig:
        return compose_config(["debug=fast", *overrides], tmp_path)

    return make
