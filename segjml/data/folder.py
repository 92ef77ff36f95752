"""Base class of the on-disk data sets: a list of (image, label) files, decoded with OpenCV / Pillow.

Every failure names the file: an unreadable image, a label value that is neither a class nor the ignore value, an
image and label of different sizes. Subclasses only say where the files are and how a raw label maps to class ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from segjml.data.errors import DataError

cv2.setNumThreads(0)  # the DataLoader workers are the parallelism


def read_image(path: str | Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB, or :class:`DataError` naming the file."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"cannot read image {path}: missing, corrupt or not an image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label(path: str | Path, mode: str = "index") -> np.ndarray:
    """A label PNG as stored: ``index`` gives the pixel indices (palette PNGs too), ``rgb`` an ``(H, W, 3)`` array."""
    try:
        with Image.open(path) as img:
            if mode == "rgb":
                return np.asarray(img.convert("RGB"))
            if img.mode not in ("P", "L", "I", "I;16"):
                raise DataError(f"label {path} is a {img.mode} image; expected a single-channel or palette PNG")
            return np.asarray(img)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"cannot read label {path}: {type(err).__name__}: {err}") from err


def reduce_zero_label(label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """ADE20K's label convention: value 0 ("other") becomes ``ignore_index`` and every other value moves down by one;
    ``ignore_index`` itself stays. ``uint8`` in, ``uint8`` out when ``ignore_index`` fits (else ``int64``)."""
    out_dtype = np.uint8 if label.dtype == np.uint8 and 0 <= ignore_index < 256 else np.int64
    shifted = label.astype(np.int64) - 1
    shifted[(label == 0) | (label == ignore_index)] = ignore_index
    return shifted.astype(out_dtype)


def to_tensors(image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """HWC uint8 image -> CHW uint8 tensor; label -> uint8 tensor (int64 if it was not uint8). They are converted to
    float / int64 on the device (:class:`~segjml.data.transforms.BatchToDevice`)."""
    image_t = torch.from_numpy(np.require(image, requirements="CW"))  # a copy only if strided or read-only (PIL)
    if image_t.ndim == 3:
        image_t = image_t.permute(2, 0, 1)
    if label.dtype != np.uint8:
        label = label.astype(np.int64)
    return image_t, torch.from_numpy(np.require(label, requirements="CW"))


class SegmentationFolder(Dataset):
    """Pairs of image and label files.

    Subclasses set ``num_classes``, ``class_names``, ``palette`` and implement :meth:`find_samples` and
    :meth:`decode_label` (raw label array -> ``uint8`` class ids with ``ignore_index``).

    Args:
        root: the data set's root directory (as distributed).
        split: split name.
        transform: albumentations-style ``transform(image=, mask=)``.
    """

    num_classes: int
    class_names: Sequence[str]
    palette: Sequence[tuple[int, int, int]]
    ignore_index = 255
    label_mode = "index"
    prepare_hint = ""

    def __init__(self, root: str | Path, split: str, transform=None) -> None:
        self.root, self.split, self.transform = Path(root), split, transform
        if not self.root.is_dir():
            raise DataError(f"data root {self.root} does not exist{self._hint()}")
        self.samples = self.find_samples()
        if not self.samples:
            raise DataError(f"{type(self).__name__} split '{split}' under {self.root} holds no images{self._hint()}")

    def _hint(self) -> str:
        return f"; {self.prepare_hint}" if self.prepare_hint else ""

    def find_samples(self) -> list[tuple[Path, Path]]:
        raise NotImplementedError

    def decode_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        raise NotImplementedError

    def _require_dir(self, path: Path) -> Path:
        if not path.is_dir():
            raise DataError(f"expected directory {path} is missing{self._hint()}")
        return path

    def _pair(self, images: list[Path], label_of) -> list[tuple[Path, Path]]:
        pairs = []
        for image in images:
            label = label_of(image)
            if not label.is_file():
                raise DataError(f"label file {label} for image {image} is missing{self._hint()}")
            pairs.append((image, label))
        return pairs

    def read_raw_label(self, path: Path) -> np.ndarray:
        return read_label(path, self.label_mode)

    def check_values(self, label: np.ndarray, path: Path) -> np.ndarray:
        if label.dtype == np.uint8 and label.ndim == 2 and 0 <= self.ignore_index < 256:
            invalid = np.ones(256, np.uint8)  # the common case, with OpenCV: a third of numpy's time
            invalid[: self.num_classes] = invalid[self.ignore_index] = 0
            if cv2.countNonZero(cv2.LUT(label, invalid)) == 0:
                return label
        bad = (label >= self.num_classes) & (label != self.ignore_index)
        if bad.any():
            value = int(label[bad][0])
            raise DataError(
                f"label {path} holds value {value}, which is neither a class id (0-{self.num_classes - 1}) "
                f"nor the ignore value {self.ignore_index}"
            )
        return label

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw ``(image, label)`` arrays of one sample, checked."""
        image_path, label_path = self.samples[index]
        image = read_image(image_path)
        label = self.check_values(self.decode_label(self.read_raw_label(label_path), label_path), label_path)
        if image.shape[:2] != label.shape[:2]:
            raise DataError(
                f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its label {label_path} is "
                f"{label.shape[1]}x{label.shape[0]}"
            )
        return image, label

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load(index)
        if self.transform is not None:
            out = self.transform(image=image, mask=label)
            image, label = out["image"], out["mask"]
        return to_tensors(image, label)
