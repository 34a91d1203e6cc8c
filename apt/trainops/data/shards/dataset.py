"""``ShardDataset``: language-modelling windows over the memory-mapped token shards of one split.

The shards of a split (:mod:`apt.trainops.data.shards.index`) are one token stream. Item ``i``
is the window ``stream[i*T : i*T + T + 1]`` (``T = seq_len``), cut exactly as
:class:`~apt.trainops.data.packing.PackedDataset` cuts an in-memory stream, so a shard folder
and a text source give the same items for the same tokens. A window may span shards.

Opening a split checks what is cheap: every shard file is there and has the size the index
gives it. The sha256 sums of the index are not read back at open time (hashing every shard of
a large corpus would take minutes on every start); re-run ``python -m apt data prepare`` to
re-check a folder (there is no separate ``data verify`` command).
"""

from __future__ import annotations

import copy
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from apt.core.errors import DataError
from apt.trainops.data.packing import num_sequences
from apt.trainops.data.shards.index import INDEX_FILE, ShardIndex, read_index

__all__ = ["SHARD_DTYPES", "ShardDataset"]

#: Token dtypes a shard may hold (little-endian on disk).
SHARD_DTYPES = ("uint16", "uint32")
#: Memory maps a dataset keeps open at once (each holds a file descriptor); the least recently
#: read shard is closed first. Re-opening one costs a few microseconds.
_MAX_OPEN = 64


class ShardDataset(Dataset[dict[str, torch.Tensor]]):
    """Fixed-length ``{"input_ids", "labels"}`` windows of one split of a prepared folder.

    Windows of ``seq_len + 1`` tokens step by ``seq_len`` over the split's stream (they overlap
    by one token); ``len = (tokens - 1) // seq_len``; the tail that fills no window is dropped.
    Items are ``LongTensor (seq_len,)`` each, ``labels`` the next token of each position.

    Shards are memory-mapped on first read, in the process that reads them: the pickled state
    (what a DataLoader worker receives) holds paths and sizes, never an open map. Finding the
    shards of a window is one bisection over the cumulative shard sizes. :meth:`get_batch`
    reads a whole batch at once, already stacked, and :meth:`stacked_batches` makes
    ``__getitems__`` return it, which is how ``create_dataloader`` reads a ShardDataset.

    Args:
        folder: the prepared folder (holding ``index.json``).
        split: the split to read (``train`` or ``val``).
        seq_len: tokens per sequence, ``>= 1``.
        index: the folder's index, if already read; default: read it.
        key: the config key that named the folder, for messages.
        document_ids: items also carry ``document_ids`` (T,), the document of each input
            token, read from the split's document offsets (for ``data.document_mask``).

    Raises:
        DataError: no folder or no ``index.json`` (unfinished preparation), no such split, a
            shard file missing or of another size than the index says, an index that
            contradicts itself, or a split too short for one window; the message names the
            folder or file and what to do.
    """

    def __init__(
        self,
        folder: str | Path,
        split: str,
        seq_len: int,
        *,
        index: ShardIndex | None = None,
        key: str = "data.source.path",
        document_ids: bool = False,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.folder = Path(folder).expanduser()
        index = read_index(self.folder, key=key) if index is None else index
        where = f"{key}: {self.folder / INDEX_FILE}"
        info = index.splits.get(split)
        if info is None:
            raise DataError(
                f"{where} has no {split!r} split (it has: {', '.join(sorted(index.splits))}). "
                + (
                    f"Training validates on it: prepare the folder again with a validation "
                    f"share above 0 (it was prepared with val_fraction={index.val_fraction})."
                    if split == "val"
                    else "Prepare the folder again."
                )
            )
        if index.dtype not in SHARD_DTYPES:
            raise DataError(
                f"{where}: dtype {index.dtype!r} is not one of {', '.join(SHARD_DTYPES)}. "
                "Prepare the folder again with this version of APT."
            )
        self.split = split
        self.seq_len = seq_len
        self.dtype = np.dtype(index.dtype).newbyteorder("<")
        self.vocab_size = index.tokenizer.vocab_size
        self.eos_id = index.tokenizer.eos_id
        self.files = tuple(shard.file for shard in info.shards)
        sizes = np.array([shard.tokens for shard in info.shards], dtype=np.int64)
        self._check_files(sizes, where)
        # Shard k holds the stream's tokens [starts[k], ends[k]).
        self._ends = np.cumsum(sizes)
        self._starts = self._ends - sizes
        # The same as lists: bisect over a list of ints is several times faster per window
        # than np.searchsorted on a scalar.
        self._end_list: list[int] = self._ends.tolist()
        self._start_list: list[int] = self._starts.tolist()
        total = int(self._ends[-1]) if len(sizes) else 0
        if total != info.tokens:
            raise DataError(
                f"{where}: the {split} shards add up to {total:,} tokens but the split says "
                f"{info.tokens:,}; the index contradicts itself. Prepare the folder again."
            )
        self.num_tokens = total
        self._len = num_sequences(total, seq_len)
        if self._len < 1:
            raise DataError(
                f"{where}: the {split!r} split holds {total} tokens, too few for one sequence of "
                f"data.seq_len={seq_len} (needs {seq_len + 1}). To fix: lower data.seq_len, or "
                "prepare the folder again from more text"
                + (" or with a larger validation share." if split == "val" else ".")
            )
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        #: ``__getitems__`` returns one stacked batch (see :meth:`stacked_batches`).
        self._stacked = False
        #: Where each document of the split starts in the stream (``document_ids`` only).
        self._doc_starts: np.ndarray | None = None
        if document_ids:
            self._doc_starts = self._read_doc_starts(self.folder / info.docs_file, where)

    def _read_doc_starts(self, path: Path, where: str) -> np.ndarray:
        try:
            starts = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(
                f"{path} cannot be read ({exc}); {where} needs it for data.document_mask. "
                "Prepare the folder again, or set data.document_mask: false."
            ) from None
        return np.asarray(starts, dtype=np.int64)

    def _document_ids(self, start: int) -> torch.Tensor:
        """(T,) the document of each input token of the window at ``start``."""
        assert self._doc_starts is not None
        positions = np.arange(start, start + self.seq_len, dtype=np.int64)
        return torch.from_numpy(np.searchsorted(self._doc_starts, positions, side="right") - 1)

    def _check_files(self, sizes: np.ndarray, where: str) -> None:
        for number, (name, tokens) in enumerate(zip(self.files, sizes.tolist(), strict=True)):
            path = self.folder / name
            expected = tokens * self.dtype.itemsize
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise DataError(
                    f"{path} is missing: {where} lists it as {self.split} shard {number + 1} of "
                    f"{len(self.files)}. Copy the whole folder again, or prepare it again."
                ) from None
            except OSError as exc:
                raise DataError(
                    f"cannot read {path}: {exc.strerror or exc}. Check its permissions."
                ) from None
            if size != expected:
                raise DataError(
                    f"{path} is {size:,} bytes, but {where} gives it {tokens:,} {self.dtype.name} "
                    f"tokens ({expected:,} bytes): the file is truncated or was replaced. Copy "
                    "the whole folder again, or prepare it again."
                )

    def __len__(self) -> int:
        return self._len

    def _shard(self, number: int) -> np.ndarray:
        """Shard ``number``, memory-mapped (read-only) on first use in this process."""
        tokens = self._open.get(number)
        if tokens is not None:
            self._open.move_to_end(number)
            return tokens
        size = int(self._ends[number] - self._starts[number])
        mapped = np.memmap(self.folder / self.files[number], self.dtype, mode="r", shape=(size,))
        # A plain ndarray over the same mapping: slicing it skips np.memmap's per-slice
        # bookkeeping (a third of the time of a read); the view keeps the mapping alive.
        tokens = mapped.view(np.ndarray)
        self._open[number] = tokens
        if len(self._open) > _MAX_OPEN:
            self._open.popitem(last=False)
        return tokens

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += self._len
        self._check_index(index)
        window = np.empty(self.seq_len + 1, dtype=np.int64)  # (T + 1,)
        self._fill(window, index * self.seq_len)
        return self._item(torch.from_numpy(window), index * self.seq_len)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self._len:
            raise IndexError(f"sequence {index} out of range (dataset has {self._len})")

    def _fill(self, window: np.ndarray, start: int) -> None:
        """Copy the stream's tokens ``[start, start + T + 1)`` into ``window`` (T + 1,)."""
        stop = start + self.seq_len + 1
        number = bisect_right(self._end_list, start)
        if stop <= self._end_list[number]:  # the window lies in one shard (nearly always)
            local = start - self._start_list[number]
            window[:] = self._shard(number)[local : local + self.seq_len + 1]
            return
        pos = start
        while pos < stop:
            end = min(stop, self._end_list[number])
            if end > pos:  # an empty shard holds nothing (and cannot be mapped)
                local = pos - self._start_list[number]
                window[pos - start : end - start] = self._shard(number)[local : local + end - pos]
                pos = end
            number += 1

    def _item(self, window: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
        """``{"input_ids", "labels"}`` (T,) each of a (T + 1,) window, and ``document_ids``
        when the dataset gives them."""
        item = {"input_ids": window[:-1], "labels": window[1:]}
        if self._doc_starts is not None:
            item["document_ids"] = self._document_ids(start)
        return item

    def get_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The windows ``indices`` as one batch: ``input_ids`` and ``labels`` (B, T) int64
        (and ``document_ids``), equal to ``default_collate([self[i] for i in indices])``.

        Each window is one slice of its shard copied into a (B, T + 1) array of the shard
        dtype; the two int64 tensors are cut from it at the end. A loop over the rows beats
        a fancy-index gather per shard here: at B = 16 over four shards the numpy calls that
        group rows by shard cost more than the 16 slices.

        Raises:
            IndexError: an index outside ``0 .. len - 1``.
        """
        T = self.seq_len
        windows = np.empty((len(indices), T + 1), dtype=self.dtype)  # (B, T + 1)
        ends, starts = self._end_list, self._start_list
        for row, index in enumerate(indices):
            self._check_index(index)
            start = index * T
            number = bisect_right(ends, start)
            if start + T + 1 <= ends[number]:
                local = start - starts[number]
                windows[row] = self._shard(number)[local : local + T + 1]
            else:  # a window across shards
                self._fill(windows[row], start)
        batch = {
            "input_ids": torch.from_numpy(windows[:, :-1].astype(np.int64)),  # (B, T)
            "labels": torch.from_numpy(windows[:, 1:].astype(np.int64)),  # (B, T)
        }
        if self._doc_starts is not None:
            positions = np.asarray(indices, dtype=np.int64)[:, None] * T + np.arange(T)
            ids = np.searchsorted(self._doc_starts, positions, side="right") - 1
            batch["document_ids"] = torch.from_numpy(ids.astype(np.int64, copy=False))
        return batch

    def stacked_batches(self) -> ShardDataset:
        """This dataset, but its ``__getitems__`` returns one :meth:`get_batch` dict.

        :func:`~apt.trainops.data.loader.create_dataloader` reads through it when it collates
        by default: the DataLoader then hands over a batch's indices at once and passes the
        stacked batch through, instead of building and stacking one item dict per window.
        """
        copied = copy.copy(self)  # via __getstate__: the copy maps its shards itself
        copied._stacked = True
        return copied

    def __getitems__(
        self, indices: list[int]
    ) -> list[dict[str, torch.Tensor]] | dict[str, torch.Tensor]:
        """The items of one batch (what a DataLoader asks for), cut from one :meth:`get_batch`;
        on a :meth:`stacked_batches` dataset, that batch itself."""
        batch = self.get_batch(indices)
        if self._stacked:
            return batch
        return [{key: rows[row] for key, rows in batch.items()} for row in range(len(indices))]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # maps are opened again by the receiving process
        return state

    def __repr__(self) -> str:
        return (
            f"ShardDataset(folder={str(self.folder)!r}, split={self.split!r}, "
            f"shards={len(self.files)}, tokens={self.num_tokens}, sequences={self._len}, "
            f"seq_len={self.seq_len})"
        )
