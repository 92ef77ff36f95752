"""Reading tensor files: the one place segjml calls ``torch.load``, always with ``weights_only=True``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def read_tensors(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """The content of a ``.safetensors`` file or of a file written by ``torch.save``.

    ``torch.load`` runs with ``weights_only=True``: tensors and plain Python values only, so a file whose pickle
    would import code is refused (with the exception torch raises; callers turn it into their own message).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    return torch.load(path, map_location=map_location, weights_only=True)
