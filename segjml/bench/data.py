"""Data benchmark: training samples per second per worker from 1024x2048 Cityscapes-layout PNGs.

``python -m segjml.bench data [--images 4] [--samples 24]``

Writes a few synthetic 1024x2048 images in the Cityscapes layout to a temporary directory, then measures, in one
process (= one DataLoader worker): decoding the PNG pair alone (the baseline), and full training samples (decode,
raw-id mapping, random scale 0.5-2, pad, crop 512x1024, flip; uint8 out), with raw ``labelIds`` and with prepared
``labelTrainIds``; and, for comparison, the whole-image pipeline segjml used before (albumentations ``RandomScale``
of the whole image, ``PadIfNeeded``, ``RandomCrop``, ``HorizontalFlip``, ``Normalize``; float32 out).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
from PIL import Image

from segjml.data.cityscapes import Cityscapes
from segjml.data.folder import read_image, read_label
from segjml.data.transforms import IMAGENET_MEAN, IMAGENET_STD, train_transform


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


def whole_image_transform(crop: tuple[int, int], scale_range: tuple[float, float]) -> A.Compose:
    """The earlier pipeline: the whole image rescaled, then padded and cropped, normalised in the worker."""
    lo, hi = scale_range
    return A.Compose(
        [
            A.RandomScale(
                scale_limit=(lo - 1.0, hi - 1.0),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                p=1.0,
            ),
            A.PadIfNeeded(
                min_height=crop[0],
                min_width=crop[1],
                border_mode=cv2.BORDER_CONSTANT,
                fill=IMAGENET_MEAN,
                fill_mask=255,
            ),
            A.RandomCrop(height=crop[0], width=crop[1]),
            A.HorizontalFlip(p=0.5),
            A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=1.0),
        ]
    )


def sample(dataset: Cityscapes):
    """Sample ``i`` with the augmentation seeded by ``i``: every pipeline draws the same scales and crops."""

    def get(i: int):
        dataset.transform.set_random_state(np.random.default_rng(i), random.Random(i))
        return dataset[i % len(dataset)]

    return get


def rates(pipelines: dict, samples: int) -> dict[str, float]:
    """Samples per second of each pipeline, the pipelines taking turns sample by sample (so that the machine's speed
    drift over the run affects all of them alike)."""
    for fn in pipelines.values():
        fn(0)
    seconds = dict.fromkeys(pipelines, 0.0)
    for i in range(samples):
        for name, fn in pipelines.items():
            t0 = time.perf_counter()
            fn(i)
            seconds[name] += time.perf_counter() - t0
    return {name: samples / seconds[name] for name in pipelines}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m segjml.bench data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--samples", type=int, default=48)
    args = parser.parse_args(argv)
    crop, scales = (512, 1024), (0.5, 2.0)
    with tempfile.TemporaryDirectory() as tmp:
        raw_root, prepared_root = Path(tmp) / "raw", Path(tmp) / "prepared"
        write_images(raw_root, args.images)
        write_images(prepared_root, args.images)
        for _, label_path in Cityscapes(prepared_root, "train").samples:
            ids = np.asarray(Image.open(label_path))
            out = label_path.with_name(label_path.name.replace("_labelIds", "_labelTrainIds"))
            Image.fromarray(Cityscapes._lut[ids], mode="L").save(out)
        raw = Cityscapes(raw_root, "train", transform=train_transform(crop, scales))
        n = len(raw)

        def decode(i: int) -> None:
            image_path, label_path = raw.samples[i % n]
            read_image(image_path)
            read_label(label_path)

        result = rates(
            {
                "decode PNG pair only (baseline)": decode,
                "train sample, raw labelIds": sample(raw),
                "train sample, prepared labelTrainIds": sample(
                    Cityscapes(prepared_root, "train", transform=train_transform(crop, scales))
                ),
                "whole-image pipeline, prepared labelTrainIds": sample(
                    Cityscapes(prepared_root, "train", transform=whole_image_transform(crop, scales))
                ),
            },
            args.samples,
        )
    base = result["decode PNG pair only (baseline)"]
    print(f"threads: cv2={cv2.getNumThreads()} (1 process = 1 DataLoader worker); 1024x2048 PNG inputs")
    print(f"{'pipeline':<44} {'samples/s':>10} {'x decode':>9}")
    for name, value in result.items():
        print(f"{name:<44} {value:10.2f} {value / base:9.2f}")


if __name__ == "__main__":
    main()
