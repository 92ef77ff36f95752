"""Checkpoints written atomically and read safely (``weights_only=True``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, truncated, unsafe)."""


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` with ``torch.save`` to a temporary file in the same directory, fsync, then ``os.replace``:
    a crash leaves either the old file or the new one, never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; any failure becomes a one-line :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling errors come as many types; the cause is kept in the message
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read safely ({type(err).__name__}: {first[:200]})") from err
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"checkpoint {path} is not a segjml checkpoint (no 'model' entry)")
    return obj


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states in a form ``torch.load(weights_only=True)`` accepts."""
    import random

    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_resumable(path: Path) -> Path | None:
    """``path`` if it is a readable checkpoint, else ``None`` (a truncated or half-written file is skipped)."""
    if not path.is_file():
        return None
    try:
        load_checkpoint(path)
    except CheckpointError:
        return None
    return path
