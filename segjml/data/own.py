"""A data set of your own: a folder of images and masks (``dataset=folder``, docs/datasets.md).

Layout: ``<root>/images/<split>/<name>.<jpg|jpeg|png|tif|tiff|bmp>`` with ``<root>/masks/<split>/<name>.png``. The
folder names, the suffixes and the split's image names (a list file, one name per line) are arguments. The classes
are a list of names or a text file with one name per line; ``dataset.num_classes`` is counted from it by the
``class_count`` resolver (:func:`class_count`).

Masks are index PNGs (palette ``P``, ``L`` or 16-bit ``I;16``) whose values are the class ids, or, with ``palette``,
RGB images whose colours are looked up in it. ``reduce_zero_label`` reads them as ADE20K's are: 0 becomes the ignore
value and every other value moves down by one. Images are read by :func:`~segjml.data.folder.read_image`: grayscale
is repeated to three channels and an alpha channel is dropped.

Every bad input is a :class:`DataError` naming the file: an image without a mask or a mask without an image, a value
that is no class, a colour that is not in the palette, an empty split.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from segjml.data.errors import DataError
from segjml.data.folder import SegmentationFolder, reduce_zero_label

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def read_classes(classes: str | Path | Sequence[str]) -> list[str]:
    """The class names: ``classes`` itself (a list), or the non-empty lines of the text file it names."""
    if isinstance(classes, (str, Path)):
        path = Path(classes)
        if not path.is_file():
            raise DataError(
                f"classes file {path} does not exist; give dataset.classes as a list ([a,b,c]) or a text file with "
                "one class name per line"
            )
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not names:
            raise DataError(f"classes file {path} names no class; write one class name per line")
        return names
    if not isinstance(classes, Iterable):  # dataset.classes=3: a count, not names
        raise DataError(
            f"dataset.classes={classes} is not a list of class names; give them as a list ([a,b,c]) or a text file "
            "with one name per line"
        )
    names = [str(name) for name in classes]
    if not names:
        raise DataError("dataset.classes is empty; name every class ([a,b,c]) or give a file with one name per line")
    return names


def class_count(classes: str | Sequence[str]) -> int:
    """``dataset.num_classes`` of ``dataset=folder``: how many names :func:`read_classes` reads (a resolver)."""
    return len(read_classes(classes))


def _colour_codes(rgb: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 colours -> one int per colour (``r << 16 | g << 8 | b``)."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


class ImageMaskFolder(SegmentationFolder):
    """Images and masks of one split, paired by file name.

    Args:
        root: the data set's root directory.
        split: the split's folder under ``images_dir`` and ``masks_dir`` (``train``, ``val``, ...).
        classes: class names, or a text file with one name per line; class ``i`` is mask value ``i``.
        images_dir: the images' folder under ``root``.
        masks_dir: the masks' folder under ``root``.
        image_suffixes: the suffixes of image files (any case).
        mask_suffix: the mask of image ``<name>.<suffix>`` is ``<name><mask_suffix>``.
        split_list: a text file with one image name per line (with or without its suffix): the split holds these
            images only, in ``<images_dir>/<split>/`` or, if that folder does not exist, in ``<images_dir>/``.
        palette: RGB masks: ``[r, g, b]`` of each mask value (one per class, one more with ``reduce_zero_label``, the
            first being the colour of 0). ``None``: masks are index PNGs.
        ignore_index: the label value that is no class.
        reduce_zero_label: 0 becomes ``ignore_index`` and every other value moves down by one.
        transform: albumentations-style ``transform(image=, mask=)``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        classes: str | Sequence[str],
        images_dir: str = "images",
        masks_dir: str = "masks",
        image_suffixes: Sequence[str] = IMAGE_SUFFIXES,
        mask_suffix: str = ".png",
        split_list: str | Path | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        transform=None,
    ) -> None:
        self.class_names = read_classes(classes)
        self.num_classes = len(self.class_names)
        self.images_dir, self.masks_dir, self.mask_suffix = images_dir, masks_dir, mask_suffix
        self.image_suffixes = tuple(s.lower() for s in image_suffixes)
        self.split_list = Path(split_list) if split_list else None
        self.ignore_index, self.reduce_zero_label = ignore_index, reduce_zero_label
        self.raw_values = self.num_classes + int(reduce_zero_label)  # mask values 0..raw_values-1 are not ignored
        self.colours = self._check_palette(palette)
        if self.colours is not None:
            self.label_mode = "rgb"
            self.palette = tuple(tuple(int(v) for v in c) for c in palette[int(reduce_zero_label) :])
        super().__init__(root, split, transform)

    def _check_palette(self, palette: Sequence[Sequence[int]] | None) -> np.ndarray | None:
        """The palette as sorted colour codes, after checking that it gives each mask value one distinct colour."""
        if palette is None:
            return None
        try:
            colours = [tuple(int(v) for v in c) for c in palette]
        except (TypeError, ValueError):  # not a list of lists of numbers
            colours = []
        if not colours or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colours):
            shown = [list(c) if isinstance(c, Iterable) else c for c in palette]
            raise DataError(f"dataset.palette={shown} must be a list of [r, g, b] colours, each value 0-255")
        if len(colours) != self.raw_values:
            extra = " (the first is the colour of 0, which dataset.reduce_zero_label ignores)"
            raise DataError(
                f"dataset.palette has {len(colours)} colours but the masks hold {self.raw_values} values: one colour "
                f"per class of dataset.classes{extra if self.reduce_zero_label else ''}"
            )
        if len(set(colours)) != len(colours):
            raise DataError(f"dataset.palette={colours} gives two mask values the same colour")
        return _colour_codes(np.asarray(colours, dtype=np.uint8))

    # --- files ----------------------------------------------------------------------------------------------------

    def _is_image(self, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() in self.image_suffixes

    def _listed_images(self, image_dir: Path) -> list[Path]:
        """The images of the split list, in its order."""
        if not self.split_list.is_file():
            raise DataError(f"split list {self.split_list} does not exist")
        by_name: dict[str, Path] = {}
        for path in filter(self._is_image, image_dir.iterdir()):
            by_name.setdefault(path.stem, path)
            by_name[path.name] = path
        images = []
        for name in (line.strip() for line in self.split_list.read_text().splitlines()):
            if name and name not in by_name:
                raise DataError(f"image '{name}' listed in {self.split_list} is not in {image_dir}")
            if name:
                images.append(by_name[name])
        return images

    def find_samples(self) -> list[tuple[Path, Path]]:
        image_dir = self.root / self.images_dir / self.split
        mask_dir = self.root / self.masks_dir / self.split
        if self.split_list is not None and not image_dir.is_dir():  # a list over one folder of every image
            image_dir, mask_dir = self.root / self.images_dir, self.root / self.masks_dir
        self._require_dir(image_dir)
        self._require_dir(mask_dir)
        found = sorted(filter(self._is_image, image_dir.iterdir()))
        stems: dict[str, Path] = {}
        for image in found:
            if image.stem in stems:
                raise DataError(f"images {stems[image.stem]} and {image} have the same name; keep one of them")
            stems[image.stem] = image
        images = found if self.split_list is None else self._listed_images(image_dir)
        if not images:
            where = f"{self.split_list} names no image" if self.split_list else f"{image_dir} holds no image"
            raise DataError(f"split '{self.split}' is empty: {where} ({', '.join(self.image_suffixes)})")
        if self.split_list is None:  # every mask of the split folder belongs to an image
            for mask in sorted(mask_dir.glob(f"*{self.mask_suffix}")):
                if mask.name[: -len(self.mask_suffix)] not in stems:
                    raise DataError(f"mask {mask} has no image in {image_dir}")
        pairs = []
        for image in images:
            mask = mask_dir / f"{image.stem}{self.mask_suffix}"
            if not mask.is_file():
                raise DataError(f"image {image} has no mask: {mask} is missing")
            pairs.append((image, mask))
        return pairs

    # --- labels ---------------------------------------------------------------------------------------------------

    def _colour_ids(self, rgb: np.ndarray, path: Path) -> np.ndarray:
        """RGB mask -> the index of each pixel's colour in the palette."""
        order = np.argsort(self.colours)
        codes = _colour_codes(rgb)
        at = np.minimum(np.searchsorted(self.colours, codes, sorter=order), len(order) - 1)
        known = self.colours[order[at]] == codes
        if not known.all():
            y, x = np.argwhere(~known)[0]
            raise DataError(
                f"mask {path} holds colour {tuple(int(v) for v in rgb[y, x])} at ({x}, {y}), which is not in "
                "dataset.palette"
            )
        return order[at].astype(np.uint8 if self.raw_values <= 256 else np.int64)

    def decode_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        values = self._colour_ids(raw, path) if self.colours is not None else raw
        bad = ((values < 0) | (values >= self.raw_values)) & (values != self.ignore_index)
        if bad.any():
            y, x = np.argwhere(bad)[0]
            ids = f"1-{self.num_classes}, 0 being ignored" if self.reduce_zero_label else f"0-{self.num_classes - 1}"
            raise DataError(
                f"mask {path} holds value {int(values[y, x])} at ({x}, {y}), which is neither a class id ({ids}) "
                f"nor the ignore value {self.ignore_index}; dataset.classes names {self.num_classes} classes"
            )
        if self.reduce_zero_label:
            values = reduce_zero_label(values, self.ignore_index)
        if values.dtype != np.uint8 and self.num_classes <= 255 and 0 <= self.ignore_index <= 255:
            values = values.astype(np.uint8)  # 16-bit masks: the loaders hand over uint8 labels when they fit
        return values
