"""Helpers shared by the tests: where the checkout is, and composing configs exactly as ``train.py`` does."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig

from segjml.config import CONFIG_DIR, compose

ROOT = Path(__file__).resolve().parents[1]


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """Compose ``configs/train.yaml`` with ``overrides`` as ``train.py`` would, output in ``output_dir``."""
    return compose(overrides, output_dir=output_dir)


def group_options(group: str) -> list[str]:
    """Every option (file stem) of a config group."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def torchrun_train(processes: int, *overrides: str) -> list[str]:
    """The command line of ``torchrun --standalone --nproc_per_node=<processes> train.py <overrides>`` (this venv)."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [torchrun, "--standalone", f"--nproc_per_node={processes}", "train.py", *overrides]


def run_in_process(script: str, overrides: list[str], output_dir: Path):
    """``python <script> <overrides>`` (``train.py``, ``eval.py``, ``predict.py`` or ``export.py``) in this process:
    the config composed as the script composes it, with its run directory ``output_dir`` (created here, as Hydra's
    app would), given to the function the script calls. Returns that function's result."""
    from segjml.engine import train
    from segjml.engine.commands import evaluate_checkpoint, predict_images
    from segjml.engine.export import export_checkpoint

    config_name, task = {
        "train.py": ("train", train),
        "eval.py": ("eval", evaluate_checkpoint),
        "predict.py": ("predict", predict_images),
        "export.py": ("export", export_checkpoint),
    }[script]
    output_dir.mkdir(parents=True, exist_ok=True)
    return task(compose(overrides, config_name, output_dir=output_dir))
