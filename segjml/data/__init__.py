"""Data sets (in their distributed on-disk formats), pipelines and loaders."""

from segjml.data.ade20k import ADE20K
from segjml.data.cityscapes import Cityscapes
from segjml.data.deepglobe import DeepGlobeLand
from segjml.data.errors import DataError
from segjml.data.loader import build_dataset, build_loader, class_names_of
from segjml.data.own import ImageMaskFolder
from segjml.data.synthetic import SyntheticSegmentation
from segjml.data.voc import PascalVOC

# The data set classes of configs/dataset, by the `_target_` that names them there: the only data sets a config read
# from a file (a checkpoint's) may build (docs/security.md).
DATASET_TARGETS = {
    f"segjml.data.{cls.__name__}": cls
    for cls in (ADE20K, Cityscapes, DeepGlobeLand, ImageMaskFolder, PascalVOC, SyntheticSegmentation)
}

__all__ = [
    "ADE20K",
    "DATASET_TARGETS",
    "Cityscapes",
    "DataError",
    "DeepGlobeLand",
    "ImageMaskFolder",
    "PascalVOC",
    "SyntheticSegmentation",
    "build_dataset",
    "build_loader",
    "class_names_of",
]
