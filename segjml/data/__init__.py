"""Data sets (in their distributed on-disk formats), pipelines and loaders."""

from segjml.data.ade20k import ADE20K
from segjml.data.cityscapes import Cityscapes
from segjml.data.deepglobe import DeepGlobeLand
from segjml.data.errors import DataError
from segjml.data.loader import build_dataset, build_loader
from segjml.data.synthetic import SyntheticSegmentation
from segjml.data.voc import PascalVOC

__all__ = [
    "ADE20K",
    "Cityscapes",
    "DataError",
    "DeepGlobeLand",
    "PascalVOC",
    "SyntheticSegmentation",
    "build_dataset",
    "build_loader",
]
