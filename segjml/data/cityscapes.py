"""Cityscapes (Cordts et al., CVPR 2016): 19 train classes, fine annotations.

Layout as distributed: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and
``gtFine/{train,val}/<city>/*_gtFine_labelIds.png`` (34 raw ids, mapped to the 19 train ids of the official
cityscapesScripts table on load; every other id -> 255). ``*_gtFine_labelTrainIds.png`` are used when present
(``python scripts/prepare_cityscapes.py`` writes them once to save the mapping).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from segjml.data.errors import DataError
from segjml.data.folder import SegmentationFolder

CLASS_NAMES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
PALETTE = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)
# raw label id -> train id (cityscapesScripts labels.py); ids 0-33 are valid raw values.
ID_TO_TRAIN_ID = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
NUM_RAW_IDS = 34
SPLIT_SIZES = {"train": 2975, "val": 500}


def raw_to_train_lut() -> np.ndarray:
    """256-entry lookup table; raw ids outside 0-33 map to the sentinel 254 (reported as invalid)."""
    lut = np.full(256, 254, dtype=np.uint8)
    lut[:NUM_RAW_IDS] = 255
    for raw, train in ID_TO_TRAIN_ID.items():
        lut[raw] = train
    return lut


class Cityscapes(SegmentationFolder):
    """Cityscapes fine annotations, ``split`` in ``train`` / ``val``."""

    num_classes = 19
    class_names = CLASS_NAMES
    palette = PALETTE
    prepare_hint = "download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (see docs/datasets.md)"
    _lut = raw_to_train_lut()

    def find_samples(self) -> list[tuple[Path, Path]]:
        image_dir = self._require_dir(self.root / "leftImg8bit" / self.split)
        label_dir = self._require_dir(self.root / "gtFine" / self.split)
        images = sorted(image_dir.glob("*/*_leftImg8bit.png"))

        def label_of(image: Path) -> Path:
            stem = image.name[: -len("_leftImg8bit.png")]
            train_ids = label_dir / image.parent.name / f"{stem}_gtFine_labelTrainIds.png"
            return train_ids if train_ids.is_file() else label_dir / image.parent.name / f"{stem}_gtFine_labelIds.png"

        return self._pair(images, label_of)

    def decode_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        if path.name.endswith("_labelTrainIds.png"):
            return raw
        if raw.max(initial=0) >= NUM_RAW_IDS:
            value = int(raw[raw >= NUM_RAW_IDS][0])
            raise DataError(f"label {path} holds raw id {value}; Cityscapes labelIds are 0-{NUM_RAW_IDS - 1}")
        return cv2.LUT(raw, self._lut) if raw.dtype == np.uint8 else self._lut[raw]
