"""Training pipeline in the DataLoader workers (albumentations), normalisation on the device.

Workers hand over ``uint8`` images and labels, as timm's prefetcher does: a quarter of the host-to-device bytes of
float32 images and no float work in the worker. :class:`BatchToDevice` normalises them where the model runs.

Training: random scale in ``scale_range``, pad to the crop size (image with the mean, label with the ignore value),
random crop, horizontal flip. :class:`RandomScaleCrop` does the first three in one step that resamples only the
crop's source region, not the whole rescaled image. Validation: the full image as stored (the evaluator slides a
window over it if needed). Labels are always resampled with nearest neighbour, so no new class ids appear.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from segjml.data.errors import DataError

IMAGENET_MEAN = (123.68, 116.28, 103.53)
IMAGENET_STD = (58.40, 57.12, 57.38)


class RandomScaleCrop(A.DualTransform):
    """Albumentations' ``RandomScale`` (bilinear image, nearest-neighbour label), ``PadIfNeeded`` (centred) and
    ``RandomCrop`` in one step that resamples only the region of the crop.

    The three draw the scale, then the crop position, from the pipeline's generator; this transform draws the same
    numbers in the same order, so a seeded pipeline picks the same scale and crop as the three would. The output
    label equals theirs exactly; the image differs by at most a few grey levels (``cv2.warpAffine`` interpolates at
    1/32 pixel, ``cv2.resize`` with finer weights). At Cityscapes size a scale of 2 resizes 8.4 Mpx for a 0.5 Mpx
    crop: the saving is most of a worker's time beside decoding.

    Args:
        height, width: the crop size.
        scale_range: ``(lo, hi)``: the scale is uniform in it.
        fill: the image padding value per channel (0-255).
        fill_mask: the label padding value (the ignore index).
    """

    def __init__(
        self, height: int, width: int, scale_range: Sequence[float], fill: Sequence[float], fill_mask: int
    ) -> None:
        super().__init__(p=1.0)
        self.height, self.width = height, width
        self.scale_range = tuple(scale_range)
        # the value cv2's padding writes into a uint8 image: the fill rounded
        self.fill = np.clip(np.rint(np.asarray(fill, dtype=np.float64)), 0, 255).astype(np.uint8)
        self.fill_mask = fill_mask

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        rows, cols = params["shape"][:2]
        lo, hi = self.scale_range
        scale = self.py_random.uniform(lo - 1.0, hi - 1.0) + 1.0  # RandomScale's draw, to the bit
        scaled = (int(rows * scale), int(cols * scale))  # and its size
        pad_top = max(self.height - scaled[0], 0) // 2
        pad_left = max(self.width - scaled[1], 0) // 2
        y0 = int((max(scaled[0], self.height) - self.height + 1) * self.py_random.random())  # RandomCrop's draws
        x0 = int((max(scaled[1], self.width) - self.width + 1) * self.py_random.random())
        return {"scaled": scaled, "origin": (y0 - pad_top, x0 - pad_left)}

    def _window(self, scaled: tuple[int, int], origin: tuple[int, int]) -> tuple[slice, slice]:
        """The part of the crop that lies inside the rescaled image (the rest is padding)."""
        (sh, sw), (oy, ox) = scaled, origin
        return slice(max(0, -oy), min(self.height, sh - oy)), slice(max(0, -ox), min(self.width, sw - ox))

    def apply(self, img: np.ndarray, scaled: tuple[int, int], origin: tuple[int, int], **params: Any) -> np.ndarray:
        out = np.empty((self.height, self.width, *img.shape[2:]), img.dtype)
        out[...] = self.fill if img.ndim == 3 else self.fill[0]
        ys, xs = self._window(scaled, origin)
        ry, rx = img.shape[0] / scaled[0], img.shape[1] / scaled[1]
        # pixel centres as cv2.resize maps them: source = (target + 0.5) * ratio - 0.5, edges replicated
        warp = np.array(
            [[rx, 0.0, (origin[1] + xs.start + 0.5) * rx - 0.5], [0.0, ry, (origin[0] + ys.start + 0.5) * ry - 0.5]]
        )
        size = (xs.stop - xs.start, ys.stop - ys.start)
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        region = cv2.warpAffine(img, warp, size, flags=flags, borderMode=cv2.BORDER_REPLICATE)
        out[ys, xs] = region.reshape(out[ys, xs].shape)
        return out

    def apply_to_mask(
        self, mask: np.ndarray, scaled: tuple[int, int], origin: tuple[int, int], **params: Any
    ) -> np.ndarray:
        out = np.full((self.height, self.width, *mask.shape[2:]), self.fill_mask, mask.dtype)
        ys, xs = self._window(scaled, origin)
        # cv2.resize's nearest neighbour: source = floor(target / (scaled / size)), clamped
        rows = _nearest(np.arange(ys.start, ys.stop) + origin[0], scaled[0], mask.shape[0])
        cols = _nearest(np.arange(xs.start, xs.stop) + origin[1], scaled[1], mask.shape[1])
        out[ys, xs] = mask.take(rows, axis=0).take(cols, axis=1)  # rows, then columns: 4x faster than one 2-D index
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "scale_range", "fill", "fill_mask")


def _nearest(target: np.ndarray, scaled: int, size: int) -> np.ndarray:
    """Source indices of ``target`` pixels when ``size`` pixels are resized to ``scaled`` (cv2's INTER_NEAREST)."""
    return np.minimum(np.floor(target * (1.0 / (scaled / size))).astype(np.intp), size - 1)


def train_transform(
    crop_size: Sequence[int],
    scale_range: Sequence[float] = (0.5, 2.0),
    hflip: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    ignore_index: int = 255,
) -> A.Compose:
    """Random scale in ``scale_range``, pad to ``crop_size`` (image with ``mean``, label with ``ignore_index``),
    random crop, horizontal flip; ``uint8`` in, ``uint8`` out."""
    h, w = crop_size
    return A.Compose([RandomScaleCrop(h, w, scale_range, fill=mean, fill_mask=ignore_index), A.HorizontalFlip(p=hflip)])


class BatchToDevice:
    """A loader's batch on the device, as the model takes it: ``uint8`` images normalised to float32 with the data
    set's ``mean`` / ``std`` (0-255 scale), channels-last if asked; labels as int64.

    Args:
        device: where the model runs.
        mean, std: per channel, 0-255 scale (``dataset.mean``, ``dataset.std``).
        channels_last: give the images in ``torch.channels_last`` memory format.
    """

    def __init__(
        self,
        device: torch.device | str,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        channels_last: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.mean = torch.tensor(list(mean), dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.channels_last = channels_last

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` uint8 images -> normalised float32 on the device."""
        if images.dtype != torch.uint8:
            raise DataError(
                f"the data set gave {images.dtype} images; segjml's data sets give uint8 images (0-255) and the "
                "trainer normalises them on the device with dataset.mean / dataset.std: return the image unnormalised"
            )
        x = images.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x.float() - self.mean) / self.std

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images(images), labels.to(self.device, non_blocking=True).long()
