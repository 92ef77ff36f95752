"""Build data sets and loaders from the ``dataset`` config group."""

from __future__ import annotations

import atexit
import contextlib
import logging
import random
import weakref

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Subset

from segjml.data.errors import DataError
from segjml.data.samplers import ResumableSampler, SeededSamples, ShardSampler
from segjml.data.transforms import train_transform
from segjml.utils import build
from segjml.utils.signals import ignore_stop_signals, stop_signals_blocked

log = logging.getLogger(__name__)


def build_dataset(cfg: DictConfig, split: str, limit: int | None = None, transform: bool = True) -> Dataset:
    """Instantiate ``cfg.<split>`` (a ``_target_`` node) with the pipeline of that split.

    Args:
        cfg: the ``dataset`` config: ``train`` / ``val`` nodes, ``num_classes``, ``crop_size``, ``scale_range``,
            ``hflip``, ``mean``, ``ignore_index``.
        split: ``train`` or ``val``.
        limit: keep only the first ``limit`` samples.
        transform: attach the training pipeline to the training split (``False``: the images as stored, for
            validation scans). Validation images are never transformed. Either way the samples are ``uint8``: they
            are normalised on the device (:class:`~segjml.data.transforms.BatchToDevice`).
    """
    pipeline = None
    if transform and split == "train":
        pipeline = train_transform(cfg.crop_size, cfg.scale_range, cfg.hflip, cfg.mean, cfg.ignore_index)
    dataset = build(cfg[split], transform=pipeline)
    classes = getattr(dataset, "num_classes", cfg.num_classes)
    if classes != cfg.num_classes:
        raise DataError(f"dataset.num_classes={cfg.num_classes} but {type(dataset).__name__} has {classes} classes")
    if limit is not None and limit < len(dataset):
        subset = Subset(dataset, range(limit))
        subset.class_names = getattr(dataset, "class_names", None)
        return subset
    return dataset


def class_names_of(dataset: Dataset, num_classes: int) -> list[str]:
    """The names of ``dataset``'s classes (its ``class_names``, kept by the ``Subset`` of ``build_dataset``), or
    ``"0" .. "C-1"`` for a data set without names."""
    return [str(n) for n in (getattr(dataset, "class_names", None) or range(num_classes))]


def _init_worker(worker_id: int) -> None:
    # Stop signals are for the main process, which saves and then shuts the workers down (segjml/utils/signals.py).
    ignore_stop_signals()
    # torch seeds each worker from the loader's generator; numpy and random follow that seed. (Augmentations are
    # re-seeded per sample by SeededSamples, so results do not depend on which worker loads a sample.)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class QuietWorkersLoader(DataLoader):
    """A DataLoader whose workers are started with the stop signals blocked (then ignore them, see
    :func:`_init_worker`): a signal sent to the whole process group reaches the main process only.

    Since its workers ignore SIGTERM, the way torch and multiprocessing end a worker that is still running, they are
    ended by :func:`shutdown_workers`: when a run ends, and at the latest when the process exits.
    """

    live: weakref.WeakSet = weakref.WeakSet()  # the iterators that own worker processes

    def __iter__(self):
        with stop_signals_blocked():
            iterator = super().__iter__()
        if self.num_workers > 0:
            QuietWorkersLoader.live.add(iterator)
        return iterator


def shutdown_workers() -> None:
    """End the workers of every :class:`QuietWorkersLoader`: torch's own shutdown (which asks them to exit), then
    SIGKILL for any that is still alive (a worker holds no state of the run)."""
    for iterator in list(QuietWorkersLoader.live):
        with contextlib.suppress(Exception):
            iterator._shutdown_workers()
        for worker in getattr(iterator, "_workers", []):
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)
        QuietWorkersLoader.live.discard(iterator)


# Registered after multiprocessing's exit handler, so it runs first: that handler sends SIGTERM to daemonic children
# and then waits for them, forever for a worker that ignores SIGTERM (after an error left an iterator alive).
atexit.register(shutdown_workers)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 2,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """A reproducible loader.

    Its workers ignore the stop signals (:class:`QuietWorkersLoader`). Training: :class:`ResumableSampler` (seeded
    shuffling per epoch, this rank's share, restartable mid-epoch) over
    :class:`SeededSamples` (augmentation seeded per sample), ``drop_last``. Evaluation: every sample exactly once over
    all ranks (:class:`ShardSampler`), so metrics synchronised across ranks equal a single-process evaluation.
    """
    if train:
        if len(dataset) == 0:
            raise DataError(
                "the training split holds no sample; set trainer.limit_train_samples to 1 or more (null: all)"
            )
        repeats = -(-batch_size * world_size // len(dataset))  # a split smaller than one batch: epochs of copies
        if repeats > 1:
            log.info(
                "the training split has %d samples, fewer than one batch (trainer.batch_size=%d x %d process(es)): "
                "each epoch shows every sample %d times",
                len(dataset),
                batch_size,
                world_size,
                repeats,
            )
        sampler = ResumableSampler(len(dataset) * repeats, seed, rank, world_size)
        dataset = SeededSamples(dataset, seed, repeats)
    else:
        sampler = ShardSampler(len(dataset), rank, world_size)
    return QuietWorkersLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=train,
        worker_init_fn=_init_worker,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )
