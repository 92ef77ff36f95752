"""Build data sets and loaders from the ``dataset`` config group."""

from __future__ import annotations

import random

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Subset

from segjml.data.errors import DataError
from segjml.data.samplers import ResumableSampler, SeededSamples, ShardSampler
from segjml.data.transforms import train_transform, val_transform
from segjml.utils import build


def build_dataset(cfg: DictConfig, split: str, limit: int | None = None, transform: bool = True) -> Dataset:
    """Instantiate ``cfg.<split>`` (a ``_target_`` node) with the pipeline of that split.

    Args:
        cfg: the ``dataset`` config: ``train`` / ``val`` nodes, ``num_classes``, ``crop_size``, ``scale_range``,
            ``hflip``, ``mean``, ``std``, ``ignore_index``.
        split: ``train`` or ``val``.
        limit: keep only the first ``limit`` samples.
        transform: attach the split's pipeline (``False``: raw uint8 images, for validation scans).
    """
    pipeline = None
    if transform and split == "train":
        pipeline = train_transform(cfg.crop_size, cfg.scale_range, cfg.hflip, cfg.mean, cfg.std, cfg.ignore_index)
    elif transform:
        pipeline = val_transform(cfg.mean, cfg.std)
    dataset = build(cfg[split], transform=pipeline)
    classes = getattr(dataset, "num_classes", cfg.num_classes)
    if classes != cfg.num_classes:
        raise DataError(f"dataset.num_classes={cfg.num_classes} but {type(dataset).__name__} has {classes} classes")
    if limit is not None and limit < len(dataset):
        subset = Subset(dataset, range(limit))
        subset.class_names = getattr(dataset, "class_names", None)
        return subset
    return dataset


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow that seed. (Augmentations are
    # re-seeded per sample by SeededSamples, so results do not depend on which worker loads a sample.)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


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

    Training: :class:`ResumableSampler` (seeded shuffling per epoch, this rank's share, restartable mid-epoch) over
    :class:`SeededSamples` (augmentation seeded per sample), ``drop_last``. Evaluation: every sample exactly once over
    all ranks (:class:`ShardSampler`), so metrics synchronised across ranks equal a single-process evaluation.
    """
    if train:
        if len(dataset) < batch_size * world_size:
            raise DataError(
                f"the training split has {len(dataset)} samples, fewer than one batch "
                f"(trainer.batch_size={batch_size} x {world_size} process(es)); lower trainer.batch_size"
            )
        sampler = ResumableSampler(len(dataset), seed, rank, world_size)
        dataset = SeededSamples(dataset, seed)
    else:
        sampler = ShardSampler(len(dataset), rank, world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=train,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )
