"""Data benchmark: training samples per second per worker from 1024x2048 Cityscapes-layout PNGs.

``python -m segjml.bench data [--images 4] [--samples 24]``

Writes a few synthetic 1024x2048 images in the Cityscapes layout to a temporary directory, then measures, in one
process (= one DataLoader worker): decoding the PNG pair alone (the baseline), and full training samples (decode,
raw-id mapping, random scale 0.5-2, pad, crop 512x1024, flip, normalise), with raw ``labelIds`` and with prepared
``labelTrainIds``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from segjml.data.cityscapes import Cityscapes
from segjml.data.folder import read_image, read_label
from segjml.data.transforms import train_transform


def write_images(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        stem = f"bench_{i:06d}_000019"
        img_dir, lbl_dir = root / "leftImg8bit" / "train" / "bench", root / "gtFine" / "train" / "bench"
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        # smooth image content (compresses like a photo, unlike white noise)
        small = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
        image = cv2.resize(small, (2048, 1024), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(img_dir / f"{stem}_leftImg8bit.png"), image)
        raw = cv2.resize(rng.integers(0, 34, (32, 64), dtype=np.uint8), (2048, 1024), interpolation=cv2.INTER_NEAREST)
        Image.fromarray(raw, mode="L").save(lbl_dir / f"{stem}_gtFine_labelIds.png")


def rate(fn, samples: int) -> float:
    fn(0)
    t0 = time.perf_counter()
    for i in range(samples):
        fn(i)
    return samples / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m segjml.bench data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--samples", type=int, default=24)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root, args.images)
        dataset = Cityscapes(root, "train", transform=train_transform((512, 1024), (0.5, 2.0)))
        n = len(dataset)

        def decode(i: int) -> None:
            image_path, label_path = dataset.samples[i % n]
            read_image(image_path)
            read_label(label_path)

        base = rate(decode, args.samples)
        raw = rate(lambda i: dataset[i % n], args.samples)
        for _, label_path in dataset.samples:
            ids = np.asarray(Image.open(label_path))
            out = label_path.with_name(label_path.name.replace("_labelIds", "_labelTrainIds"))
            Image.fromarray(Cityscapes._lut[ids], mode="L").save(out)
        prepared = Cityscapes(root, "train", transform=dataset.transform)
        train_ids = rate(lambda i: prepared[i % n], args.samples)
    print(f"threads: cv2={cv2.getNumThreads()} (1 process = 1 DataLoader worker); 1024x2048 PNG inputs")
    print(f"{'pipeline':<44} {'samples/s':>10} {'x decode':>9}")
    for name, value in (
        ("decode PNG pair only (baseline)", base),
        ("train sample, raw labelIds", raw),
        ("train sample, prepared labelTrainIds", train_ids),
    ):
        print(f"{name:<44} {value:10.2f} {value / base:9.2f}")


if __name__ == "__main__":
    main()
