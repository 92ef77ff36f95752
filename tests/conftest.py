"""Test session settings: two CPU threads, no network, no W&B; shared helpers live in ``tests/helpers.py``."""

from __future__ import annotations

import os

import pytest
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


@pytest.fixture(scope="session")
def preset_configs():
    """Every preset (``<group>=<option>``, and ``train``), composed once per session with the fixed paths of
    ``scripts/preset_snapshot.py``: name -> config (output directory: the run directory)."""
    from scripts.preset_snapshot import composed, presets
    from segjml.config import CONFIG_DIR

    return {name: composed(*spec) for name, spec in presets(CONFIG_DIR).items()}
