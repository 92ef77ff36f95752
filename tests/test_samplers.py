"""The resumable training sampler, the evaluation shard sampler and per-sample seeding."""

import numpy as np
import pytest
import torch

from segjml.data.samplers import ResumableSampler, SeededSamples, ShardSampler
from segjml.engine.trainer import batches


def test_every_epoch_is_a_permutation_that_depends_on_seed_and_epoch():
    s = ResumableSampler(10, seed=3)
    epochs = []
    for epoch in range(3):
        s.set_epoch(epoch)
        keys = list(s)
        assert sorted(k - epoch * 10 for k in keys) == list(range(10))  # keys are epoch * n + index
        epochs.append([k - epoch * 10 for k in keys])
    assert epochs[0] != epochs[1] != epochs[2]
    other = ResumableSampler(10, seed=4)
    assert list(other) != epochs[0]
    again = ResumableSampler(10, seed=3)
    assert list(again) == epochs[0]


@pytest.mark.parametrize("seed", [0, 3, 12345])
def test_one_process_training_order_is_the_one_every_earlier_run_drew(seed):
    """The demo's (one process) shuffling: epoch ``e`` is ``randperm(n)`` of a CPU generator seeded with
    ``seed * 1_000_003 + e``, the formula the sampler has always used; keys are ``e * n + index``."""
    n = 37
    s = ResumableSampler(n, seed=seed)
    for epoch in range(4):
        s.set_epoch(epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        assert list(s) == (order + epoch * n).tolist()


def test_set_epoch_with_a_start_continues_the_same_epoch():
    s = ResumableSampler(12, seed=0)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=5)
    assert list(s) == full[5:] and len(s) == 7


def test_ranks_split_an_epoch_without_overlap_dropping_the_remainder():
    parts = []
    for rank in range(3):
        s = ResumableSampler(11, seed=1, rank=rank, world_size=3)
        s.set_epoch(1)
        parts.append(list(s))
        assert len(s) == 3
    flat = [k for p in parts for k in p]
    assert len(set(flat)) == 9  # 11 // 3 * 3, no sample twice
    single = ResumableSampler(11, seed=1)
    single.set_epoch(1)
    assert set(flat) == set(list(single)[:9])


def test_unshuffled_keys_are_in_order():
    s = ResumableSampler(5, shuffle=False)
    s.set_epoch(1)
    assert list(s) == [5, 6, 7, 8, 9]


def test_more_processes_than_samples_is_refused():
    with pytest.raises(ValueError, match="3 training samples cannot be split over 4 processes"):
        ResumableSampler(3, world_size=4)


def test_shard_sampler_sees_every_sample_once_over_ranks():
    shards = [list(ShardSampler(10, rank, 3)) for rank in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))


class _Draws(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return index, float(np.random.rand())


def test_seeded_samples_draw_the_same_augmentation_for_the_same_key_whatever_came_before():
    data = SeededSamples(_Draws(), seed=7)
    first = {k: data[k] for k in (0, 5, 9)}
    np.random.seed(123)  # what ran before must not matter
    again = {k: data[k] for k in (9, 0, 5)}
    assert first == again
    assert first[5][0] == first[9][0] == 1  # keys 5 and 9 are sample 1 of epochs 1 and 2 ...
    assert first[5][1] != first[9][1]  # ... with different augmentation
    assert SeededSamples(_Draws(), seed=8)[5] != first[5]


def test_batches_resume_at_the_data_position_of_an_iteration():
    from segjml.data.loader import build_loader

    class Index(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.tensor(i)

    loader = build_loader(Index(), 3, True, 0, seed=0)
    stream = batches(loader, 0)
    straight = [next(stream).tolist() for _ in range(7)]  # 3 batches per epoch: crosses two epoch ends
    resumed = batches(loader, 4)
    assert [next(resumed).tolist() for _ in range(3)] == straight[4:]
