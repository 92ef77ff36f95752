"""Labeled / unlabeled splits of a training set for semi-supervised learning (paper Appendix I, Table 11).

Two ways to get the labeled images:

- :func:`read_split_file`: a published list, e.g. the PASCAL VOC ``92`` / ``183`` / ... ``labeled.txt`` files of the
  U2PL / AugSeg splits (one image id per line, ``2007_000733``; a path prefix and an image suffix are accepted, as in
  the Cityscapes lists ``leftImg8bit/train/jena/jena_000078_000019_leftImg8bit.png``). Table 11's numbers use these.
- :func:`labeled_indices`: a seeded draw of a count or a fraction of the images, optionally class-balanced.

:func:`unlabeled_indices` is the complement. Every function returns sorted dataset indices.

:func:`split_training_set` applies ``dataset.labeled`` to a training set (a count, a fraction or a split file) and
:func:`labeled_subset` makes a split's ``Subset``; :func:`image_ids` and :func:`class_presence` read what they need
from the data set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from numbers import Integral, Real
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset, Subset

from segjml.data.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def split_size(num_images: int, labeled: int | float | str) -> int:
    """Number of labeled images: ``labeled`` itself if it is an integer count, ``ceil(labeled * num_images)`` if it
    is a fraction in ``(0, 1]`` (a float, or text such as ``"1/16"``). The ceiling gives the published split sizes:
    VOC train_aug (10582) at 1/16, 1/8, 1/4, 1/2 -> 662, 1323, 2646, 5291; Cityscapes (2975) -> 186, 372, 744, 1488.
    """
    if isinstance(labeled, bool):
        raise ValueError(f"labeled={labeled!r} must be a count of images or a fraction such as 1/16")
    if isinstance(labeled, Integral):
        count = int(labeled)
    else:
        try:
            fraction = Fraction(labeled) if isinstance(labeled, str) else labeled
        except ValueError:
            raise ValueError(f"labeled={labeled!r} must be a count of images or a fraction such as 1/16") from None
        if not isinstance(fraction, Real) or not 0 < fraction <= 1:
            raise ValueError(f"labeled={labeled!r} as a fraction must be in (0, 1]; give a count as an integer")
        # Fraction arithmetic is exact; a float fraction is nudged so that e.g. 1/3 * 3 is not 1.0000000000000002
        exact = fraction * num_images
        count = math.ceil(exact) if isinstance(exact, Fraction) else math.ceil(exact - 1e-9)
    if not 1 <= count <= num_images:
        raise ValueError(f"labeled={labeled!r} gives {count} labeled images, outside [1, {num_images}]")
    return count


def _permutation(num_images: int, seed: int) -> np.ndarray:
    # a CPU torch generator: the same order on every machine and every torch device
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed)).numpy()


def labeled_indices(
    num_images: int,
    labeled: int | float | str,
    seed: int = 0,
    class_presence: np.ndarray | torch.Tensor | None = None,
) -> list[int]:
    """Sorted indices of the labeled images, the same for the same arguments on every machine.

    Without ``class_presence``: the first ``k`` images of a permutation drawn from ``seed``.

    With ``class_presence`` (``(num_images, C)`` bool: which classes each image holds), a greedy class-balanced pick
    that raises the count of the rarest class first. ``count[c]`` is the number of picked images holding ``c``;
    repeat ``k`` times:

    1. among the classes that some unpicked image holds, take those with the lowest ``count`` (the tied set);
    2. pick the unpicked image that comes first in the seeded permutation among those holding a tied class;
    3. add its classes to ``count``. When no unpicked image holds any class, the rest are taken in permutation order.

    So every class is represented as soon as possible and the per-class counts stay as even as the images allow (a
    class present in every image, such as VOC's background, still rises with every pick); ties between classes and
    between images are broken by the seeded permutation.

    Args:
        num_images: size of the training set.
        labeled: a count (92, 183, ...) or a fraction in ``(0, 1]`` (``1/16``, ``"1/16"``), see :func:`split_size`.
        seed: seed of the permutation.
        class_presence: optional ``(num_images, C)`` bool array for the class-balanced pick.
    """
    k = split_size(num_images, labeled)
    order = _permutation(num_images, seed)
    if class_presence is None:
        return sorted(order[:k].tolist())
    presence = np.asarray(class_presence.cpu() if torch.is_tensor(class_presence) else class_presence).astype(bool)
    if presence.ndim != 2 or presence.shape[0] != num_images:
        raise ValueError(
            f"class_presence has shape {presence.shape}; expected (num_images, num_classes) = ({num_images}, C)"
        )
    num_classes = presence.shape[1]
    ordered = presence[order]  # row r: the classes of the r-th image in permutation order
    # per class, the permutation positions of the images holding it, in order; a pointer skips the picked ones
    queues = [np.flatnonzero(ordered[:, c]) for c in range(num_classes)]
    heads = [0] * num_classes
    picked = np.zeros(num_images, dtype=bool)  # indexed by permutation position
    count = np.zeros(num_classes, dtype=np.int64)
    chosen: list[int] = []
    for _ in range(k):
        available = []
        for c in range(num_classes):
            queue = queues[c]
            while heads[c] < len(queue) and picked[queue[heads[c]]]:
                heads[c] += 1
            if heads[c] < len(queue):
                available.append(c)
        if available:
            lowest = min(count[c] for c in available)
            position = min(queues[c][heads[c]] for c in available if count[c] == lowest)
        else:  # only images without any class are left
            position = int(np.flatnonzero(~picked)[0])
        picked[position] = True
        count += ordered[position]
        chosen.append(int(order[position]))
    return sorted(chosen)


def unlabeled_indices(num_images: int, labeled_idx: Sequence[int]) -> list[int]:
    """Sorted indices of the images not in ``labeled_idx`` (which must be distinct indices in ``[0, num_images)``)."""
    labeled = [int(i) for i in labeled_idx]
    bad = [i for i in labeled if not 0 <= i < num_images]
    if bad:
        raise ValueError(f"labeled index {bad[0]} is outside [0, {num_images})")
    if len(set(labeled)) != len(labeled):
        raise ValueError("labeled indices hold duplicates; give each labeled image once")
    mask = np.ones(num_images, dtype=bool)
    mask[labeled] = False
    return np.flatnonzero(mask).tolist()


def image_id(name: str | Path) -> str:
    """The id of an image named by a path or a file name: its base name without an image suffix
    (``JPEGImages/2007_000032.jpg`` -> ``2007_000032``)."""
    base = PurePosixPath(str(name).replace("\\", "/")).name
    for suffix in IMAGE_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def read_split_file(path: str | Path, ids: Sequence[str | Path]) -> list[int]:
    """Sorted dataset indices of the images a published split file lists.

    Each non-empty line names one image by its first whitespace-separated field, which :func:`image_id` reduces to
    an id (so ``2007_000032``, ``JPEGImages/2007_000032.jpg`` and ``2007_000032.jpg SegmentationClass/...png`` all
    name ``2007_000032``).

    Args:
        path: the list file (e.g. the U2PL / AugSeg ``pascal/92/labeled.txt``).
        ids: the data set's images in index order, as ids or paths (for segjml's folder data sets,
            ``[image for image, _ in dataset.samples]``).

    Raises:
        ValueError: (one line) a missing or empty file, an id the data set does not hold, an id listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"split file {path} does not exist")
    index: dict[str, int] = {}
    for i, name in enumerate(ids):
        key = image_id(name)
        if key in index:
            raise ValueError(f"the data set holds image id {key!r} twice (indices {index[key]} and {i})")
        index[key] = i
    out: list[int] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        key = image_id(fields[0])
        if key not in index:
            raise ValueError(
                f"{path} line {number} names image {key!r}, which is not in the data set ({len(index)} images); "
                "check that the split file belongs to this data set and split"
            )
        if key in seen:
            raise ValueError(f"{path} lists image {key!r} twice (lines {seen[key]} and {number})")
        seen[key] = number
        out.append(index[key])
    if not out:
        raise ValueError(f"split file {path} lists no images")
    return sorted(out)


def _is_count_or_fraction(value) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    try:
        Fraction(str(value))
        return True
    except ValueError:
        return False


def _base(dataset: Dataset) -> tuple[Dataset, list[int]]:
    """The data set under any ``Subset`` wrappers and the base indices of ``dataset``'s samples."""
    indices = list(range(len(dataset)))
    while isinstance(dataset, Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def image_ids(dataset: Dataset) -> list[str]:
    """Each image's id (its file name without suffix), in index order; a data set without files numbers them."""
    base, indices = _base(dataset)
    samples = getattr(base, "samples", None)
    if samples is None:
        return [str(i) for i in indices]
    return [Path(samples[i][0]).stem for i in indices]


def _label(base: Dataset, index: int) -> np.ndarray:
    """One raw label map; folder data sets read the label file only (not the image)."""
    if hasattr(base, "samples") and hasattr(base, "read_raw_label"):
        path = Path(base.samples[index][1])
        return base.decode_label(base.read_raw_label(path), path)
    return np.asarray(base[index][1])


def class_presence(dataset: Dataset, num_classes: int, ignore_index: int) -> np.ndarray:
    """``(N, C)`` bool: which classes each image's label holds (reads every label once, without augmentation).

    This reads the labels of the images that end up unlabeled too, as any class-balanced split does; the published
    split files (``dataset.labeled=<file>``) need no labels."""
    base, indices = _base(dataset)
    presence = np.zeros((len(indices), num_classes), dtype=bool)
    for i, index in enumerate(indices):
        label = _label(base, index).reshape(-1)
        label = label[label != ignore_index]
        presence[i, np.unique(label[label < num_classes]).astype(np.int64)] = True
    return presence


def split_training_set(dcfg: DictConfig, raw_train: Dataset) -> tuple[list[int], list[int]]:
    """Labeled and unlabeled image indices of the training set for ``dataset.labeled``.

    ``dataset.labeled``: a count (``92``), a fraction (``0.05`` or ``"1/16"``: ``ceil(fraction * N)`` images), or the
    path of a split file (one image id per line, as the published VOC / Cityscapes lists). A count or fraction draws a
    class-balanced split, deterministic for ``dataset.labeled_seed`` (``segjml.ssl.splits.labeled_indices``).
    ``raw_train`` is the training set without its pipeline (labels are read for the balance).
    """
    labeled = dcfg.labeled
    n = len(raw_train)
    if _is_count_or_fraction(labeled):
        count = split_size(n, labeled)
        presence = class_presence(raw_train, dcfg.num_classes, dcfg.ignore_index)
        lab = labeled_indices(n, count, seed=int(dcfg.get("labeled_seed", 0)), class_presence=presence)
    else:
        path = Path(str(labeled))
        if not path.is_file():
            raise DataError(
                f"dataset.labeled={labeled}: no such split file; get the published lists (docs/ssl.md) or give a "
                "count (92) or a fraction (1/16)"
            )
        lab = read_split_file(path, image_ids(raw_train))
    return sorted(lab), unlabeled_indices(n, lab)


def labeled_subset(dataset: Dataset, indices: list[int]) -> Subset:
    """``dataset``'s samples ``indices`` as one ``Subset`` of the base data set (nested subsets are flattened, so
    ``SeededSamples`` finds the pipeline it seeds)."""
    base, base_indices = _base(dataset)
    subset = Subset(base, [base_indices[i] for i in indices])
    subset.class_names = getattr(base, "class_names", None)
    return subset
