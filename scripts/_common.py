"""Helpers shared by the preparation scripts: atomic PNG writes and the final count check."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def write_png(array: np.ndarray, path: Path, palette: list[tuple[int, int, int]] | None = None) -> None:
    """Write an index PNG (palette PNG when ``palette`` is given) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array.astype(np.uint8), mode="L")
    if palette is not None:
        img = img.convert("P")
        flat = [c for rgb in palette for c in rgb]
        img.putpalette(flat + [0] * (768 - len(flat)))
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def check_count(what: str, found: int, expected: int | None) -> int:
    """Print the count check; return the exit code (1 on a mismatch)."""
    if expected is None:
        print(f"{what}: {found}")
        return 0
    if found != expected:
        print(f"{what}: found {found}, expected {expected}", file=sys.stderr)
        return 1
    print(f"{what}: {found} (as expected)")
    return 0
