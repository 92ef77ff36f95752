"""Small helpers shared across the package."""

from segjml.utils.instantiate import build

__all__ = ["build"]
