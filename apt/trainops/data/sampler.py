"""``ResumableSampler``: seeded per-epoch order, split across ranks, resumable mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from apt.core.errors import DataError

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Dataset indices for one rank: the same order on every run with the same seed.

    Each epoch draws a permutation from a ``torch.Generator`` seeded with ``seed + epoch`` (or
    takes ``0..n-1`` without shuffling) and this rank takes every ``world_size``-th index from
    position ``rank``. All ranks get the same count, so they step in lockstep:

    * ``drop_last=True``: the last ``num_samples % world_size`` indices of the order are dropped;
    * ``drop_last=False``: the order wraps around to pad it to a multiple of ``world_size``.

    The sampler keeps no cursor while iterating: DataLoader workers prefetch ahead, so only the
    training loop knows how many samples were consumed. To resume mid-epoch, the loop calls
    ``set_epoch(epoch)`` and ``set_start(consumed)`` and the next iteration yields exactly the
    indices that were not consumed yet.

    Args:
        num_samples: length of the dataset.
        shuffle: draw a seeded permutation each epoch; False: dataset order.
        seed: base seed, identical on every rank.
        rank: this process's rank in ``0 .. world_size - 1``.
        world_size: number of data-parallel ranks.
        drop_last: drop the uneven tail (True) or pad by wrapping around (False).

    Raises:
        DataError: fewer samples than ranks, so some rank would get none.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}"
            )
        if num_samples < world_size and (drop_last or num_samples == 0):
            raise DataError(
                f"{num_samples} sequences cannot be shared by {world_size} ranks (each needs at "
                "least one). Add data, lower data.seq_len, or use fewer ranks."
            )
        super().__init__()
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self._start = 0
        if drop_last:
            self._per_rank = num_samples // world_size
        else:
            self._per_rank = -(-num_samples // world_size)

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            # A start belongs to the epoch it was set for. DataLoader draws from the sampler
            # lazily, so a resumed epoch with no step left never consumed its start.
            self._start = 0
        self.epoch = epoch

    def set_start(self, index: int) -> None:
        """Skip the first ``index`` indices of this rank's order, on the next iteration only.

        ``index`` counts samples this rank already consumed in the current epoch (not batches).
        """
        if not 0 <= index <= self._per_rank:
            raise ValueError(
                f"start must be in 0..{self._per_rank} (samples per rank per epoch), got {index}"
            )
        self._start = index

    def epoch_indices(self, epoch: int | None = None) -> list[int]:
        """This rank's full order for ``epoch`` (default: the current one), ignoring the start."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        total = self._per_rank * self.world_size
        if total > len(order):
            # Pad by wrapping around; repeat whole copies when there are far fewer samples
            # than ranks.
            order = (order * (-(-total // len(order))))[:total]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return iter(self.epoch_indices()[start:])

    def __len__(self) -> int:
        """Indices per rank in a whole epoch (a resumed epoch yields ``len - start`` of them)."""
        return self._per_rank

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "start"}``: the epoch and the pending start of the next iteration."""
        return {"epoch": self.epoch, "start": self._start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.set_epoch(int(state["epoch"]))
        self.set_start(int(state.get("start", 0)))

    def __repr__(self) -> str:
        return (
            f"ResumableSampler(num_samples={self.num_samples}, shuffle={self.shuffle}, "
            f"seed={self.seed}, rank={self.rank}, world_size={self.world_size}, "
            f"drop_last={self.drop_last}, epoch={self.epoch})"
        )
