"""Tiny data sets written in exactly the distributed on-disk layouts (real PNG / JPEG / .mat encodings)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from segjml.data.voc import voc_palette


def _image(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def write_cityscapes(root: Path, sizes=(("train", 3), ("val", 2)), h: int = 32, w: int = 64) -> Path:
    """Raw labelIds PNGs holding every raw id 0-33 in stripes."""
    rng = np.random.default_rng(0)
    for split, n in sizes:
        for i in range(n):
            city = "aachen" if i % 2 == 0 else "bremen"
            stem = f"{city}_{i:06d}_000019"
            _save(_image(rng, h, w), root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            raw = (np.arange(w)[None, :].repeat(h, 0) + i) % 34
            _save(
                Image.fromarray(raw.astype(np.uint8), mode="L"),
                root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
            )
    return root


def write_voc(
    root: Path,
    train=("2007_000032", "2007_000039"),
    val=("2007_000033",),
    sbd_extra=("2008_000002",),
    h: int = 24,
    w: int = 32,
) -> tuple[Path, Path]:
    """VOCdevkit/VOC2012 with palette PNG labels, and an SBD dataset/ directory with cls/*.mat."""
    rng = np.random.default_rng(1)
    voc = root / "VOCdevkit" / "VOC2012"
    sbd = root / "benchmark_RELEASE" / "dataset"
    palette = [c for rgb in voc_palette(256) for c in rgb]
    for i, name in enumerate([*train, *val, *sbd_extra]):
        _save(_image(rng, h, w), voc / "JPEGImages" / f"{name}.jpg", quality=95)
        label = ((np.arange(h)[:, None] // 4 + np.arange(w)[None, :] // 8 + i) % 21).astype(np.uint8)
        label[0, :] = 255
        if name not in sbd_extra:
            img = Image.fromarray(label, mode="P")
            img.putpalette(palette)
            _save(img, voc / "SegmentationClass" / f"{name}.png")
        seg = ((label.astype(int) + 1) % 21).astype(np.uint8)  # SBD's own labels differ, to tell them apart
        (sbd / "cls").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(sbd / "cls" / f"{name}.mat", {"GTcls": {"Segmentation": seg, "CategoriesPresent": [1]}})
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("\n".join(train) + "\n")
    (sets / "val.txt").write_text("\n".join(val) + "\n")
    # SBD lists: its train holds a VOC val image, which train_aug must exclude
    (sbd / "train.txt").write_text("\n".join([train[0], val[0], *sbd_extra]) + "\n")
    (sbd / "val.txt").write_text(train[-1] + "\n")
    return voc, sbd


def write_ade20k(root: Path, sizes=(("training", 3), ("validation", 2)), h: int = 20, w: int = 30) -> Path:
    rng = np.random.default_rng(2)
    base = root / "ADEChallengeData2016"
    for split, n in sizes:
        for i in range(n):
            stem = f"ADE_{'train' if split == 'training' else 'val'}_{i + 1:08d}"
            _save(_image(rng, h, w), base / "images" / split / f"{stem}.jpg", quality=95)
            label = ((np.arange(h)[:, None] * w + np.arange(w)[None, :] + i) % 151).astype(np.uint8)
            _save(Image.fromarray(label, mode="L"), base / "annotations" / split / f"{stem}.png")
    return root


DEEPGLOBE_COLOURS = [(0, 255, 255), (255, 255, 0), (255, 0, 255), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)]


def write_deepglobe(root: Path, n: int = 6, h: int = 16, w: int = 21) -> Path:
    """RGB masks with every colour (slightly off-pure, as JPEG-era masks are), one column per colour."""
    rng = np.random.default_rng(3)
    folder = root / "land" / "train"
    for i in range(n):
        stem = f"{100 + i * 7}"
        _save(_image(rng, h, w), folder / f"{stem}_sat.jpg", quality=95)
        mask = np.zeros((h, w, 3), dtype=np.uint8)
        for col in range(w):
            colour = np.array(DEEPGLOBE_COLOURS[(col + i) % 7])
            mask[:, col] = np.where(colour > 0, 250, 3)  # thresholded at 128
        _save(Image.fromarray(mask, mode="RGB"), folder / f"{stem}_mask.png")
    return root
