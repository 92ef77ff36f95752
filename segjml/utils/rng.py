"""The random generators' states a checkpoint holds, so a resumed run draws what the uninterrupted one would have."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python, NumPy, torch and, on a GPU, this process's CUDA generator states (``device``; each rank saves its own)
    in a form ``torch.load(weights_only=True)`` accepts. Only the process's own GPU is saved: the set of visible GPUs
    may differ when the run resumes (one GPU per task under ``CUDA_VISIBLE_DEVICES``)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what :func:`capture_rng_state` saved; the CUDA generator of ``device`` (this process's GPU). States
    must be CPU tensors (load the checkpoint with ``map_location="cpu"``)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # written before the per-device format: every GPU's generator, by index
        cuda = cuda[device.index or 0] if device is not None and len(cuda) > (device.index or 0) else None
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)
