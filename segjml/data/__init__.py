"""Data sets, pipelines and loaders."""

from segjml.data.loader import build_dataset, build_loader
from segjml.data.synthetic import SyntheticSegmentation

__all__ = ["SyntheticSegmentation", "build_dataset", "build_loader"]
