"""ResumableSampler: seeded epochs, rank partitions, exact mid-epoch resume."""

from __future__ import annotations

import itertools

import pytest
import torch

from apt.core.errors import DataError
from apt.trainops.data import ResumableSampler


def test_epochs_differ_and_same_seed_repeats() -> None:
    a = ResumableSampler(100, shuffle=True, seed=7)
    b = ResumableSampler(100, shuffle=True, seed=7)
    epoch0 = list(a)
    assert epoch0 == list(b)
    assert sorted(epoch0) == list(range(100)) and epoch0 != list(range(100))
    a.set_epoch(1)
    b.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 == list(b) and epoch1 != epoch0 and sorted(epoch1) == list(range(100))
    # The order is torch.randperm seeded with seed + epoch, reproducible without the class.
    gen = torch.Generator().manual_seed(7 + 1)
    assert epoch1 == torch.randperm(100, generator=gen).tolist()
    assert list(ResumableSampler(100, shuffle=True, seed=8)) != epoch0
    assert list(ResumableSampler(5, shuffle=False, seed=7)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("n", "world"), [(100, 4), (103, 4), (10, 3)])
def test_ranks_partition_the_epoch(n: int, world: int) -> None:
    parts = []
    for rank in range(world):
        sampler = ResumableSampler(n, shuffle=True, seed=3, rank=rank, world_size=world)
        sampler.set_epoch(2)
        parts.append(list(sampler))
        assert len(parts[-1]) == len(sampler) == n // world
    flat = list(itertools.chain(*parts))
    assert len(set(flat)) == len(flat) == (n // world) * world  # no overlap, tail dropped
    single = ResumableSampler(n, shuffle=True, seed=3)
    single.set_epoch(2)
    assert set(flat) == set(list(single)[: len(flat)])  # ranks share one global order


def test_no_drop_last_pads_to_equal_sizes() -> None:
    parts = [
        list(ResumableSampler(10, shuffle=True, seed=0, rank=r, world_size=4, drop_last=False))
        for r in range(4)
    ]
    assert [len(p) for p in parts] == [3, 3, 3, 3]
    assert set(itertools.chain(*parts)) == set(range(10))


@pytest.mark.parametrize(("world", "rank"), [(1, 0), (2, 1)])
def test_resume_mid_epoch_yields_exactly_the_rest(world: int, rank: int) -> None:
    batch, k, epoch = 4, 3, 5
    first = ResumableSampler(50, shuffle=True, seed=11, rank=rank, world_size=world)
    first.set_epoch(epoch)
    full = list(first)
    consumed = list(itertools.islice(iter(first), k * batch))

    resumed = ResumableSampler(50, shuffle=True, seed=11, rank=rank, world_size=world)
    resumed.set_epoch(epoch)
    resumed.set_start(k * batch)
    rest = list(resumed)
    assert consumed + rest == full
    assert list(resumed) == full  # the start applies to one iteration only


def test_state_dict_round_trip_and_validation() -> None:
    sampler = ResumableSampler(20, shuffle=True, seed=1)
    sampler.set_epoch(3)
    sampler.set_start(8)
    state = sampler.state_dict()
    assert state == {"epoch": 3, "start": 8}
    other = ResumableSampler(20, shuffle=True, seed=1)
    other.load_state_dict(state)
    sampler_rest = list(sampler)
    assert list(other) == sampler_rest and len(sampler_rest) == 12
    with pytest.raises(ValueError, match=r"start must be in 0\.\.20"):
        other.set_start(21)
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(20, shuffle=True, seed=1, rank=2, world_size=2)
    with pytest.raises(DataError, match="3 sequences cannot be shared by 4 ranks"):
        ResumableSampler(3, shuffle=True, seed=1, world_size=4)
