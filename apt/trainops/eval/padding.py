"""Padding a validation set to a multiple of the world size with samples that score nothing.

Every rank must run the same number of forward passes (FSDP gathers parameters collectively),
yet a sample repeated to even out the shards would be scored twice. Padding with copies whose
targets are all ignored keeps both: equal shards and exact metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

__all__ = ["PaddedForRanks"]


class PaddedForRanks(Dataset[Any]):
    """``dataset`` followed by ``make_padding(dataset[i])`` samples up to a multiple of
    ``world_size``.

    Args:
        dataset: a map-style dataset with a length.
        world_size: number of ranks sharing the dataset.
        make_padding: turns a real sample into one that contributes no loss term.
    """

    def __init__(
        self, dataset: Dataset[Any], world_size: int, make_padding: Callable[[Any], Any]
    ) -> None:
        self.dataset = dataset
        self.real = len(dataset)  # type: ignore[arg-type]
        self.total = math.ceil(self.real / world_size) * world_size
        self.make_padding = make_padding

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, index: int) -> Any:
        if index < self.real:
            return self.dataset[index]
        return self.make_padding(self.dataset[index % self.real])
