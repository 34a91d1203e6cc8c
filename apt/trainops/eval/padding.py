"""Padding that scores nothing: validation sets evened out over ranks, batches of unequal rows.

Every rank must run the same number of forward passes (FSDP gathers parameters collectively),
yet a sample repeated to even out the shards would be scored twice. Padding with copies whose
targets are all ignored keeps both: equal shards and exact metrics. Likewise :func:`pad_collate`
pads short rows with ignored targets, so a batch of unequal rows scores what its rows hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from apt.trainops.engine.tasks.causal_lm import IGNORE_INDEX, split_batch

__all__ = ["PaddedForRanks", "pad_collate"]

#: The input id of padded positions: any valid id, since their targets are ignored.
PAD_ID = 0


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


def pad_collate(samples: list[Any]) -> Any:
    """``default_collate``, except that language-modelling rows of unequal length are padded.

    A dict sample (``input_ids``, optional ``labels`` and ``attention_mask``) or an
    ``(inputs, targets)`` pair whose 1-D tensors differ in length among the batch is padded at
    the end to the longest: inputs with id 0, targets with ``-100`` (ignored), and dicts get an
    ``attention_mask`` (0 on padding). A dict without ``labels`` gets the labels it stands for
    (the next tokens, its last position ignored) before padding, so the padding never becomes a
    target. Rows of one length and the same keys are stacked as they are; padded dict rows
    keep only those three keys.
    """
    first = samples[0]
    if isinstance(first, dict) and "input_ids" in first:
        lengths = {len(s["input_ids"]) for s in samples}
        # Rows with other keys (a PaddedForRanks row has labels, the real ones may not) are
        # made alike too: default_collate would keep the first row's keys only.
        if len(lengths) == 1 and all(s.keys() == first.keys() for s in samples):
            return default_collate(samples)
        longest = max(lengths)
        rows = [_dict_row(s, longest) for s in samples]
        return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    if isinstance(first, list | tuple) and len(first) == 2:
        if len({len(s[0]) for s in samples}) == 1:
            return default_collate(samples)
        longest = max(len(s[0]) for s in samples)
        inputs = torch.stack([_pad(s[0], longest, PAD_ID) for s in samples])
        targets = torch.stack([_pad(s[1], longest, IGNORE_INDEX) for s in samples])
        return inputs, targets
    return default_collate(samples)


def _dict_row(sample: dict[str, Any], length: int) -> dict[str, torch.Tensor]:
    """One dict sample padded to ``length``: ``input_ids``, ``labels``, ``attention_mask``."""
    one = {k: torch.as_tensor(v)[None] for k, v in sample.items()}  # a batch of one row
    input_ids, labels = split_batch(one)
    mask = one.get("attention_mask", torch.ones_like(input_ids))
    return {
        "input_ids": _pad(input_ids[0], length, PAD_ID),
        "labels": _pad(labels[0], length, IGNORE_INDEX),
        "attention_mask": _pad(mask[0], length, 0),
    }


def _pad(row: Any, length: int, value: int) -> torch.Tensor:
    row = torch.as_tensor(row)
    return torch.nn.functional.pad(row, (0, length - len(row)), value=value)
