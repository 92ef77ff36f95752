"""Seeds: every random stream of a run is seeded from the run's ``seed`` and where the stream is in the run (epoch,
iteration, rank), so a resumed run draws what the uninterrupted one would have, whatever the worker count.

:func:`derive_seed` is the one formula that mixes those numbers into a seed; :func:`seed_everything` seeds Python's,
NumPy's and torch's global generators.
"""

from __future__ import annotations

import random

import numpy as np
import torch

BASE = 1_000_003
"""The prime base of :func:`derive_seed`."""

SSL_STEP, RANK = 1, 2
"""Stream tags (the part after the seed) of the SSL step's draws and of a rank's global generators. The training
order's stream ``(seed, epoch)`` has no tag: its formula, ``seed * 1_000_003 + epoch``, is older than the tags, and a
run shuffles as it always has."""


def derive_seed(*parts: int) -> int:
    """The seed of the stream named by integer ``parts``: their digits in base ``BASE`` (1_000_003), modulo ``2**63``,

        ``(((parts[0] * BASE + parts[1]) * BASE + parts[2]) * BASE + ...) % 2**63``

    (a non-negative value that torch's, NumPy's and Python's generators all take). Two tuples of the same length get
    different seeds when their parts after the first are below ``BASE``; tuples of different lengths cannot meet
    either when the first part after the seed is a stream tag (``SSL_STEP``, ``RANK``) and epochs stay below ``BASE``.

    Examples: the training order of ``epoch`` is ``derive_seed(seed, epoch)``; the SSL step's draws are
    ``derive_seed(seed, SSL_STEP, iteration, rank)``.
    """
    seed = 0
    for part in parts:
        seed = (seed * BASE + int(part)) % 2**63
    return seed


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (``seed % 2**32``: the range it takes) and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s global generators once the model is built: ``seed`` on rank 0 (a single process
    draws as it always has), ``derive_seed(seed, RANK, rank)`` elsewhere."""
    return seed if rank == 0 else derive_seed(seed, RANK, rank)
