"""Samplers that make data order and augmentation exactly reproducible, across resumes and worker counts.

The training sampler yields *sample keys* ``k = epoch * n + index``. :class:`SeededSamples` turns a key back into the
sample index and seeds the augmentation from ``(seed, k)``, so a sample's augmentation does not depend on which
worker loads it or on where a run was resumed. A split smaller than one batch is sampled as ``repeats`` copies
(``n = repeats * len(split)``, ``index % len(split)`` the sample), each copy augmented by its own key. The position
inside an epoch can be restored (``set_epoch(epoch, start)``), which is what an exact resume needs.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from segjml.utils.seeding import derive_seed


class ResumableSampler(Sampler[int]):
    """Shuffled sample keys of one rank, epoch by epoch, restartable mid-epoch.

    Every epoch is a permutation of ``range(n)`` drawn from ``derive_seed(seed, epoch)``; rank ``r`` of ``w`` takes
    positions ``r, r + w, ...`` of its first ``w * (n // w)`` entries (the remainder is dropped, as with
    ``drop_last``).

    Args:
        n: data set size.
        seed: shuffling seed.
        rank, world_size: this process and the number of processes.
        shuffle: shuffle every epoch (``False``: keys in order).
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        self.n, self.seed, self.rank, self.world_size, self.shuffle = n, seed, rank, world_size, shuffle
        self.per_rank = n // world_size
        if self.per_rank == 0:
            raise ValueError(f"{n} training samples cannot be split over {world_size} processes")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Next iteration yields epoch ``epoch`` from its ``start``-th sample of this rank on."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        mine = order[: self.per_rank * self.world_size][self.rank :: self.world_size][self.start :]
        base = self.epoch * self.n
        return iter((mine + base).tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``w`` takes samples ``r, r + w, ...``: every sample exactly once over all ranks (evaluation)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededSamples(Dataset):
    """Maps a sample key ``k`` to ``dataset[k % n]`` with the augmentation seeded from ``(seed, k)``.

    The wrapped data set's ``transform`` (an albumentations ``Compose``) gets fresh generators for every sample;
    Python's and NumPy's global generators are seeded as well for transforms that use them. ``repeats`` copies of
    the data set make one epoch (``len`` is ``repeats * n``), so that a split smaller than one batch still fills
    batches; every copy of a sample is augmented with its own key.
    """

    def __init__(self, dataset: Dataset, seed: int, repeats: int = 1) -> None:
        self.dataset, self.seed, self.repeats = dataset, seed, repeats
        self.n = len(dataset)  # type: ignore[arg-type]
        inner = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
        self.transform = getattr(inner, "transform", None)

    def __len__(self) -> int:
        return self.n * self.repeats

    def __getitem__(self, key: int):
        # Not derive_seed(seed, key): every run's augmentations (the demo's figures in docs/benchmarks.md among them)
        # were drawn from this seed, and a one-process run keeps drawing them.
        s = (self.seed * 0x9E3779B1 + key * 0x85EBCA77) % 2**63
        if self.transform is not None and hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(np.random.default_rng(s), random.Random(s))
        random.seed(s)
        np.random.seed(s % 2**32)
        return self.dataset[key % self.n]
