"""Fine-tuning datasets: encoded examples -> rows with completion-only labels.

Legend: ``L`` tokens of one example, ``T`` = ``seq_len``.

An example of ``L + 1`` tokens gives ``L`` positions: ``input_ids = ids[:-1]`` and
``labels = ids[1:]``, with ``-100`` where the next token is not trained (prompt, system and user
tokens, role headers). Each example is shifted on its own, so no label ever reaches into the
next example.

* :class:`SFTDataset`: one example a row, of its own length (a collate function pads a batch,
  e.g. :func:`~apt.trainops.eval.pad_collate`). Padding comes after the example, so causal
  attention already keeps the example from seeing it, and its labels are ``-100``.
* :class:`PackedSFTDataset`: several examples a row of exactly ``T`` positions, placed by
  best-fit decreasing (:func:`pack_rows`); ``document_ids`` number the examples of a row (the
  padding at its end is one more document), so attention stays inside each example and
  positions restart at each (``APTModel.forward(document_ids=...)``). A packed row scores the
  same tokens as its examples alone.
* :func:`join_collate` (``padding_free``): the examples of a batch joined into one row of
  their total length, no padding at all, ``document_ids`` numbering them.

Both are plain numpy arrays and the same for the same examples (no randomness): picklable for
DataLoader workers, and a resumed run reads the same rows.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "IGNORE_INDEX",
    "EncodedExamples",
    "PackedSFTDataset",
    "SFTDataset",
    "join_collate",
    "pack_rows",
]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedExamples:
    """The token ids of many examples, flat.

    Attributes:
        tokens: every example's ids back to back, 1-D int32 (half the memory of int64).
        trained: 1-D bool, like ``tokens``: the loss covers this token.
        offsets: example ``i`` is ``tokens[offsets[i] : offsets[i + 1]]``, at least 2 tokens.
    """

    tokens: np.ndarray
    trained: np.ndarray
    offsets: np.ndarray

    @classmethod
    def join(cls, examples: Sequence[tuple[np.ndarray, np.ndarray]]) -> EncodedExamples:
        """Join ``(ids, trained)`` pairs (each of at least 2 tokens)."""
        lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        empty = np.zeros(0, dtype=np.int64)
        tokens = np.concatenate([ids for ids, _ in examples]) if examples else empty
        trained = np.concatenate([t for _, t in examples]) if examples else empty.astype(bool)
        return cls(tokens.astype(np.int32), trained.astype(bool), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def positions(self, index: int) -> int:
        """``L``: the positions (input/label pairs) of example ``index``."""
        return int(self.offsets[index + 1] - self.offsets[index]) - 1

    @property
    def num_targets(self) -> int:
        """Trained labels over all examples (an example's first token is never a label)."""
        firsts = self.offsets[:-1]
        return int(self.trained.sum() - self.trained[firsts].sum()) if len(self) else 0

    def example(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)`` of example ``index``, ``(L,)`` each."""
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        ids = torch.from_numpy(self.tokens[start:stop].astype(np.int64))  # (L + 1,)
        trained = torch.from_numpy(self.trained[start + 1 : stop])  # (L,)
        labels = torch.where(trained, ids[1:], torch.full_like(ids[1:], IGNORE_INDEX))
        return ids[:-1], labels


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Place items of ``lengths`` into rows of ``capacity`` by best-fit decreasing.

    Items are taken longest first (ties: the lower index first) and each goes into the row
    whose free space is the smallest that holds it (ties: the row that came to that space
    last), or a new row. The same lengths always give the same rows.

    Returns:
        The rows, each a list of item indices in the order they were placed.

    Raises:
        ValueError: an item longer than ``capacity`` or shorter than 1.
    """
    rows: list[list[int]] = []
    spaces: list[int] = []  # the distinct free spaces some row has, sorted
    holders: dict[int, list[int]] = {}  # free space -> the rows with that much left
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        need = lengths[index]
        if not 1 <= need <= capacity:
            raise ValueError(f"item {index} has length {need}, outside 1..{capacity}")
        at = bisect.bisect_left(spaces, need)
        if at == len(spaces):
            row, space = len(rows), capacity
            rows.append([])
        else:
            space = spaces[at]
            row = holders[space].pop()
            if not holders[space]:
                del holders[space], spaces[at]
        rows[row].append(index)
        left = space - need
        if left:
            if left not in holders:
                holders[left] = []
                bisect.insort(spaces, left)
            holders[left].append(row)
    return rows


class SFTDataset(Dataset[dict[str, torch.Tensor]]):
    """One example a row: ``{"input_ids", "labels"}``, ``(L,)`` each, ``L <= seq_len``.

    Args:
        examples: the encoded examples (each at most ``seq_len + 1`` tokens).
        seq_len: the longest row.
    """

    def __init__(self, examples: EncodedExamples, seq_len: int) -> None:
        longest = max((examples.positions(i) for i in range(len(examples))), default=0)
        if longest > seq_len:
            raise ValueError(f"an example has {longest} positions, more than seq_len={seq_len}")
        self.examples = examples
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range (dataset has {len(self)})")
        input_ids, labels = self.examples.example(index)
        return {"input_ids": input_ids, "labels": labels}

    @property
    def num_targets(self) -> int:
        """Completion tokens the loss covers, over the whole dataset."""
        return self.examples.num_targets

    def __repr__(self) -> str:
        return f"SFTDataset(examples={len(self)}, seq_len={self.seq_len})"


class PackedSFTDataset(Dataset[dict[str, torch.Tensor]]):
    """Rows of ``seq_len`` positions holding whole examples: ``{"input_ids", "labels",
    "document_ids"}``, ``(T,)`` each.

    Args:
        examples: the encoded examples (each at most ``seq_len + 1`` tokens).
        seq_len: positions per row.
        pad_id: the input id of the padding at the end of a row (its labels are ``-100``).
    """

    def __init__(self, examples: EncodedExamples, seq_len: int, *, pad_id: int) -> None:
        lengths = [examples.positions(i) for i in range(len(examples))]
        rows = pack_rows(lengths, seq_len)
        self.examples = examples
        self.seq_len = seq_len
        self.pad_id = pad_id
        #: Row ``r`` holds examples ``row_examples[row_offsets[r] : row_offsets[r + 1]]``.
        self.row_examples = np.array([i for row in rows for i in row], dtype=np.int64)
        self.row_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(row) for row in rows], out=self.row_offsets[1:])
        self.fill = sum(lengths) / (len(rows) * seq_len) if rows else 0.0

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range (dataset has {len(self)})")
        T = self.seq_len
        input_ids = torch.full((T,), self.pad_id, dtype=torch.int64)  # (T,)
        labels = torch.full((T,), IGNORE_INDEX, dtype=torch.int64)  # (T,)
        members = self.row_examples[self.row_offsets[index] : self.row_offsets[index + 1]]
        document_ids = torch.full((T,), len(members), dtype=torch.int64)  # padding: its own
        at = 0
        for document, example in enumerate(members.tolist()):
            ids, targets = self.examples.example(example)  # (L,), (L,)
            input_ids[at : at + len(ids)] = ids
            labels[at : at + len(ids)] = targets
            document_ids[at : at + len(ids)] = document
            at += len(ids)
        return {"input_ids": input_ids, "labels": labels, "document_ids": document_ids}

    @property
    def num_targets(self) -> int:
        """Completion tokens the loss covers, over the whole dataset."""
        return self.examples.num_targets

    def __repr__(self) -> str:
        return (
            f"PackedSFTDataset(rows={len(self)}, examples={len(self.examples)}, "
            f"seq_len={self.seq_len}, fill={self.fill:.0%})"
        )


def join_collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A padding-free batch: ``{"input_ids", "labels", "document_ids"}``, ``(1, sum L)`` each,
    the examples back to back in the order given and ``document_ids`` 0, 1, ... numbering them.

    Each example's labels were shifted on their own, so no label reaches into the next one; with
    attention kept inside each document the row computes what the examples would alone.

    Raises:
        ValueError: a sample without ``input_ids`` and ``labels`` of one length, or one that is
            packed already (has ``document_ids``).
    """
    for i, sample in enumerate(samples):
        if not isinstance(sample, dict) or "document_ids" in sample:
            raise ValueError(
                f"padding_free joins single examples, but sample {i} is "
                + ("a packed row" if isinstance(sample, dict) else type(sample).__name__)
                + "; set data.source.packing: false"
            )
        if "labels" not in sample or sample["labels"].shape != sample["input_ids"].shape:
            raise ValueError(f"sample {i} needs input_ids and labels of one length")
    lengths = torch.tensor([len(s["input_ids"]) for s in samples])
    document_ids = torch.repeat_interleave(torch.arange(len(samples)), lengths)
    return {
        "input_ids": torch.cat([s["input_ids"] for s in samples])[None],
        "labels": torch.cat([s["labels"] for s in samples])[None],
        "document_ids": document_ids[None],
    }
