"""Test session settings: two CPU threads, no network, no W&B; shared helpers live in ``tests/helpers.py``."""

from __future__ import annotations

import os

import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_report_header(config) -> list[str]:
    """The versions the suite ran with, at the top of its output (CI installs whatever the floors allow)."""
    import hydra
    import timm
    import torchvision

    return [
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
        f"hydra-core {hydra.__version__}"
    ]
