"""Seeds of a run's random streams (segjml/utils/seeding.py)."""

import random

import numpy as np
import torch

from segjml.engine.ssl import step_generator
from segjml.utils.seeding import RANK, SSL_STEP, derive_seed, rank_seed, seed_everything


def test_derive_seed_reads_the_parts_as_base_1000003_digits():
    assert derive_seed(7, 3) == 7 * 1_000_003 + 3  # the training order's seed of epoch 3
    assert derive_seed(7, SSL_STEP, 40, 2) == ((7 * 1_000_003 + 1) * 1_000_003 + 40) * 1_000_003 + 2
    assert derive_seed(2**62, 5, 5, 5) < 2**63  # reduced to what every generator takes


def test_a_runs_streams_never_share_a_seed():
    """Training order (seed, epoch), SSL steps (seed, SSL_STEP, iteration, rank) and the ranks' global generators
    (seed, RANK, rank) of runs with seeds 0-3: all different."""
    for seed in range(4):
        order = {derive_seed(seed, epoch) for epoch in range(200)}
        steps = {derive_seed(seed, SSL_STEP, it, r) for it in range(300) for r in range(8)}
        ranks = {rank_seed(seed, r) for r in range(1, 8)} | {derive_seed(seed, RANK, 0)}
        assert len(order) == 200 and len(steps) == 300 * 8 and len(ranks) == 8
        assert not (order & steps) and not (order & ranks) and not (steps & ranks)


def test_rank_0_keeps_the_run_seed_and_other_ranks_seed_every_generator():
    assert rank_seed(5, 0) == 5  # one process draws as it always has
    seed = rank_seed(5, 1)
    assert seed >= 2**32  # NumPy's global generator takes 32 bits: seed_everything reduces it
    seed_everything(seed)
    drawn = (random.random(), np.random.rand(), torch.rand(()).item())
    expected = (random.Random(seed).random(), np.random.RandomState(seed % 2**32).rand())
    assert drawn[:2] == expected
    assert drawn[2] == torch.rand((), generator=torch.Generator().manual_seed(seed)).item()


def test_the_ssl_step_generator_depends_on_seed_iteration_and_rank_only():
    def draw(*args):
        return torch.rand(4, generator=step_generator(*args))

    torch.manual_seed(123)  # the global state plays no part
    first = draw(0, 10, 0)
    torch.manual_seed(456)
    assert torch.equal(first, draw(0, 10, 0))
    for other in ((1, 10, 0), (0, 11, 0), (0, 10, 1)):
        assert not torch.equal(first, draw(*other)), other
