"""``create_dataloader``: a DataLoader over a :class:`ResumableSampler`, seeded end to end."""

from __future__ import annotations

import random
from collections.abc import Callable, Sized
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from apt.core.cpus import available_cpus
from apt.trainops.data.sampler import ResumableSampler

__all__ = ["create_dataloader", "seed_worker"]


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed ``random`` and numpy from the worker's torch seed.

    PyTorch already gives each worker the seed ``base_seed + worker_id``, with ``base_seed``
    drawn from the loader's seeded generator; this extends it to the other RNGs a dataset or
    collate function might use, so augmentations repeat exactly from run to run.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


@runtime_checkable
class _StacksBatches(Protocol):
    """A dataset that can read a whole batch at once (``ShardDataset``): ``stacked_batches()``
    returns a dataset whose ``__getitems__`` gives the batch already stacked."""

    def stacked_batches(self) -> Dataset[Any]: ...


def _pass_stacked(batch: Any) -> Any:
    """``collate_fn`` for a dataset whose ``__getitems__`` already stacked the batch."""
    return batch


class _EpochSeededLoader(DataLoader[Any]):
    """Re-seeds the generator PyTorch draws the workers' base seed from, from (seed, epoch),
    at every ``iter``: a resumed process, which builds a fresh loader, then gives the workers of
    an epoch the same random streams as the process that never stopped."""

    def __iter__(self) -> Any:
        sampler = self.sampler
        if self.generator is not None and isinstance(sampler, ResumableSampler):
            self.generator.manual_seed(sampler.seed * 1_000_003 + sampler.epoch)
        return super().__iter__()


def create_dataloader(
    dataset: Dataset[Any],
    batch_size: int = 32,
    num_workers: int | None = None,
    shuffle: bool = True,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
) -> DataLoader[Any]:
    """A DataLoader whose ``.sampler`` is a :class:`ResumableSampler` for this rank.

    The batches depend only on the dataset, ``batch_size``, ``seed``, the epoch (set with
    ``loader.sampler.set_epoch``) and the rank layout, never on ``num_workers``: the sampler
    runs in the main process and workers are seeded from a generator seeded with ``seed``.

    A dataset with ``stacked_batches()`` (``ShardDataset``) is read a batch at a time: with
    the default ``collate_fn`` the loader reads through ``dataset.stacked_batches()``, whose
    ``__getitems__`` returns the batch already stacked, and passes it through uncollated. The
    batches are the same as ``default_collate`` of the items; the sampler, ``len(loader)``
    and ``drop_last`` are unchanged. A ``collate_fn`` given here reads item by item.

    Args:
        dataset: a map-style dataset (``__len__`` and ``__getitem__``).
        batch_size: samples per batch on this rank.
        num_workers: worker processes; 0 loads in the main process. None: 4, or fewer when
            fewer CPUs are available (torch warns about more workers than CPUs).
        shuffle: seeded shuffle each epoch.
        seed: seed of the sampler's permutations and of the workers.
        rank: this rank, in ``0 .. world_size - 1``.
        world_size: data-parallel ranks sharing the dataset.
        drop_last: drop the uneven tail, both across ranks and the last partial batch.
        collate_fn: batch builder; None: ``torch.utils.data.default_collate``, or the
            dataset's own stacked batches when it has them.
        pin_memory: page-lock batches for faster host-to-GPU copies.
        persistent_workers: keep workers alive between epochs (needs ``num_workers > 0``).
        prefetch_factor: batches each worker loads ahead (needs ``num_workers > 0``).

    Returns:
        The DataLoader; resume mid-epoch with ``loader.sampler.set_epoch(e)`` and
        ``loader.sampler.set_start(samples_consumed_this_epoch)``.

    Raises:
        DataError: the dataset has fewer samples than ranks.
        ValueError: ``batch_size < 1`` or ``num_workers < 0``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers is None:
        num_workers = min(4, available_cpus())
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if not isinstance(dataset, Sized):
        raise TypeError("create_dataloader needs a map-style dataset with __len__")
    sampler = ResumableSampler(
        len(dataset),
        shuffle=shuffle,
        seed=seed,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
    )
    if collate_fn is None and isinstance(dataset, _StacksBatches):
        dataset, collate_fn = dataset.stacked_batches(), _pass_stacked
    generator = torch.Generator()
    generator.manual_seed(seed)
    extra: dict[str, Any] = {}
    # Passed only when set: torch rejects both with num_workers=0, and its message says why.
    if persistent_workers:
        extra["persistent_workers"] = True
    if prefetch_factor is not None:
        extra["prefetch_factor"] = prefetch_factor
    return _EpochSeededLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=drop_last,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        generator=generator,
        **extra,
    )
