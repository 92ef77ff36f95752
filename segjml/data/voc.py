"""PASCAL VOC 2012 (Everingham et al.) with the SBD augmentation (Hariharan et al., ICCV 2011): 21 classes.

Layout (the root is ``VOCdevkit/VOC2012``): ``JPEGImages/*.jpg``, ``SegmentationClass/*.png`` (palette PNGs whose
indices are the classes, 255 = void), ``ImageSets/Segmentation/{train,val}.txt``. The ``train_aug`` split (10582
images) reads ``SegmentationClassAug/*.png`` and ``ImageSets/Segmentation/train_aug.txt``, written by
``python scripts/prepare_voc_aug.py`` from SBD's ``cls/*.mat`` with the VOC val images excluded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segjml.data.errors import DataError
from segjml.data.folder import SegmentationFolder

CLASS_NAMES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
SPLIT_SIZES = {"train": 1464, "val": 1449, "train_aug": 10582}


def voc_palette(n: int = 256) -> list[tuple[int, int, int]]:
    """The VOC colour map: the bits of the class index spread over the high bits of R, G and B."""
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append((r, g, b))
    return palette


class PascalVOC(SegmentationFolder):
    """PASCAL VOC 2012, ``split`` in ``train`` / ``val`` / ``train_aug``."""

    num_classes = 21
    class_names = CLASS_NAMES
    palette = tuple(voc_palette(21))
    prepare_hint = "see docs/datasets.md; the train_aug split is made by `python scripts/prepare_voc_aug.py --help`"

    def find_samples(self) -> list[tuple[Path, Path]]:
        if self.split not in SPLIT_SIZES:
            raise DataError(f"PASCAL VOC split must be one of {', '.join(SPLIT_SIZES)}, got '{self.split}'")
        listing = self.root / "ImageSets" / "Segmentation" / f"{self.split}.txt"
        if not listing.is_file():
            raise DataError(f"split list {listing} is missing{self._hint()}")
        label_dir = self._require_dir(
            self.root / ("SegmentationClassAug" if self.split == "train_aug" else "SegmentationClass")
        )
        image_dir = self._require_dir(self.root / "JPEGImages")
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        images = [image_dir / f"{name}.jpg" for name in names]
        for image in images:
            if not image.is_file():
                raise DataError(f"image {image} listed in {listing} is missing")
        return self._pair(images, lambda image: label_dir / f"{image.stem}.png")

    def decode_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        return raw  # palette indices are the class ids
