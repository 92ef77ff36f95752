"""Train and val pipelines (albumentations): random scale, flip, pad with mean / ignore, random crop, normalise.

Labels are always resampled with nearest neighbour, so no new class ids appear.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2

IMAGENET_MEAN = (123.68, 116.28, 103.53)
IMAGENET_STD = (58.40, 57.12, 57.38)


def train_transform(
    crop_size: Sequence[int],
    scale_range: Sequence[float] = (0.5, 2.0),
    hflip: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    ignore_index: int = 255,
) -> A.Compose:
    """Random scale in ``scale_range``, pad to ``crop_size`` (image with ``mean``, label with ``ignore_index``),
    random crop, horizontal flip, normalisation of 0-255 images with ``mean`` / ``std``."""
    h, w = crop_size
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
                min_height=h, min_width=w, border_mode=cv2.BORDER_CONSTANT, fill=tuple(mean), fill_mask=ignore_index
            ),
            A.RandomCrop(height=h, width=w),
            A.HorizontalFlip(p=hflip),
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0),
        ]
    )


def val_transform(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> A.Compose:
    """Normalisation only: validation keeps the full image (the evaluator slides a window over it if needed)."""
    return A.Compose([A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0)])
