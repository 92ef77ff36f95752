"""DeepGlobe Land Cover (Demir et al., CVPR-W 2018): 6 classes + unknown, 803 images, 5-fold cross-validation.

Layout: ``land/train/<id>_sat.jpg`` + ``<id>_mask.png`` (RGB, 2448x2448). Each mask channel is thresholded at 128
and the colour mapped to its class; unknown (0, 0, 0) -> ignore. Folds: the images sorted by file name, fold ``f``
validates on the slice ``[160 f, 160 (f + 1))`` (160 images) and trains on the other 643.
``python scripts/prepare_deepglobe.py`` can write index PNGs (``<id>_label.png``) once; they are used when present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segjml.data.errors import DataError
from segjml.data.folder import SegmentationFolder, read_label

CLASS_NAMES = ("urban", "agriculture", "rangeland", "forest", "water", "barren")
PALETTE = ((0, 255, 255), (255, 255, 0), (255, 0, 255), (0, 255, 0), (0, 0, 255), (255, 255, 255))
UNKNOWN = (0, 0, 0)
NUM_FOLDS, FOLD_SIZE, NUM_IMAGES = 5, 160, 803


def colour_lut() -> np.ndarray:
    """Thresholded colour code ``4 r + 2 g + b`` (bits) -> class id; 255 unknown; 254 not a DeepGlobe colour."""
    lut = np.full(8, 254, dtype=np.uint8)
    for cls, (r, g, b) in enumerate(PALETTE):
        lut[4 * (r >= 128) + 2 * (g >= 128) + (b >= 128)] = cls
    lut[0] = 255
    return lut


def fold_split(names: list[str], fold: int, split: str) -> list[str]:
    """The file names of ``split`` (``train`` / ``val``) in ``fold`` (0-4), from names sorted by file name."""
    if not 0 <= fold < NUM_FOLDS:
        raise DataError(f"DeepGlobe fold must be 0-{NUM_FOLDS - 1}, got {fold}")
    names = sorted(names)
    lo, hi = FOLD_SIZE * fold, FOLD_SIZE * (fold + 1)
    if split == "val":
        return names[lo:hi]
    if split == "train":
        return names[:lo] + names[hi:]
    raise DataError(f"DeepGlobe split must be 'train' or 'val', got '{split}'")


class DeepGlobeLand(SegmentationFolder):
    """DeepGlobe Land Cover, ``split`` in ``train`` / ``val`` of fold ``fold``."""

    num_classes = 6
    class_names = CLASS_NAMES
    palette = PALETTE
    prepare_hint = "download the DeepGlobe land-cover training set into <root>/land/train (see docs/datasets.md)"
    _lut = colour_lut()

    def __init__(self, root: str | Path, split: str, fold: int = 0, transform=None) -> None:
        self.fold = fold
        super().__init__(root, split, transform)

    def find_samples(self) -> list[tuple[Path, Path]]:
        image_dir = self._require_dir(self.root / "land" / "train")
        images = sorted(image_dir.glob("*_sat.jpg"))
        chosen = set(fold_split([p.name for p in images], self.fold, self.split))

        def label_of(image: Path) -> Path:
            stem = image.name[: -len("_sat.jpg")]
            index = image_dir / f"{stem}_label.png"
            return index if index.is_file() else image_dir / f"{stem}_mask.png"

        return self._pair([p for p in images if p.name in chosen], label_of)

    def read_raw_label(self, path: Path) -> np.ndarray:
        return read_label(path, "index" if path.name.endswith("_label.png") else "rgb")

    def decode_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        if raw.ndim == 2:  # prepared index PNG
            return raw
        code = (raw[..., 0] >= 128).astype(np.uint8) * 4 + (raw[..., 1] >= 128) * 2 + (raw[..., 2] >= 128)
        label = self._lut[code]
        if (label == 254).any():
            y, x = np.argwhere(label == 254)[0]
            raise DataError(
                f"label {path} holds colour {tuple(int(v) for v in raw[y, x])} at ({x}, {y}), which is "
                f"not a DeepGlobe land-cover colour"
            )
        return label
