"""ADE20K SceneParsing (Zhou et al., CVPR 2017): 150 classes.

Layout: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` and
``ADEChallengeData2016/annotations/{training,validation}/*.png``. Label 0 ("other") -> ignore (255), every other
label minus 1. The root is the directory that holds ``ADEChallengeData2016``.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np

from segjml.data.errors import DataError
from segjml.data.folder import SegmentationFolder, reduce_zero_label

CLASS_NAMES = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
)
SPLITS = {"train": "training", "val": "validation"}
SPLIT_SIZES = {"train": 20210, "val": 2000}


def _palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """Distinct colours spread over hue (a generated palette for visualisation)."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65 + 0.35 * (i % 3) / 2, 0.95 - 0.3 * (i % 2))
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return tuple(out)


class ADE20K(SegmentationFolder):
    """ADE20K SceneParsing, ``split`` in ``train`` / ``val``."""

    num_classes = 150
    class_names = CLASS_NAMES
    palette = _palette(150)
    prepare_hint = "download ADEChallengeData2016.zip and unpack it under the data set root (see docs/datasets.md)"

    def find_samples(self) -> list[tuple[Path, Path]]:
        if self.split not in SPLITS:
            raise DataError(f"ADE20K split must be one of {', '.join(SPLITS)}, got '{self.split}'")
        base = self.root / "ADEChallengeData2016"
        image_dir = self._require_dir(base / "images" / SPLITS[self.split])
        label_dir = self._require_dir(base / "annotations" / SPLITS[self.split])
        return self._pair(sorted(image_dir.glob("*.jpg")), lambda image: label_dir / f"{image.stem}.png")

    def decode_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        if raw.max(initial=0) > self.num_classes:
            value = int(raw[raw > self.num_classes][0])
            raise DataError(f"label {path} holds value {value}; ADE20K labels are 0-{self.num_classes}")
        return reduce_zero_label(raw)  # 0 -> 255 (ignore), k -> k - 1
