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

from collections import OrderedDict
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
    shards of a window is one ``np.searchsorted`` over the cumulative shard sizes.

    Args:
        folder: the prepared folder (holding ``index.json``).
        split: the split to read (``train`` or ``val``).
        seq_len: tokens per sequence, ``>= 1``.
        index: the folder's index, if already read; default: read it.
        key: the config key that named the folder, for messages.

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
        if not 0 <= index < self._len:
            raise IndexError(f"sequence {index} out of range (dataset has {self._len})")
        start = index * self.seq_len
        stop = start + self.seq_len + 1
        number = int(self._ends.searchsorted(start, side="right"))
        if stop <= self._ends[number]:  # the window lies in one shard (nearly always)
            local = start - int(self._starts[number])
            one = self._shard(number)[local : local + self.seq_len + 1].astype(np.int64)
            return self._item(torch.from_numpy(one), start)
        window = np.empty(self.seq_len + 1, dtype=np.int64)  # (T + 1,)
        pos = start
        while pos < stop:
            end = min(stop, int(self._ends[number]))
            if end > pos:  # an empty shard holds nothing (and cannot be mapped)
                local = pos - int(self._starts[number])
                window[pos - start : end - start] = self._shard(number)[local : local + end - pos]
                pos = end
            number += 1
        return self._item(torch.from_numpy(window), start)

    def _item(self, window: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
        """``{"input_ids", "labels"}`` (T,) each of a (T + 1,) window, and ``document_ids``
        when the dataset gives them."""
        item = {"input_ids": window[:-1], "labels": window[1:]}
        if self._doc_starts is not None:
            item["document_ids"] = self._document_ids(start)
        return item

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """The items of one batch (what a DataLoader asks for): the windows are copied into one
        (B, T + 1) array, so a batch costs one Python call instead of one per window."""
        T = self.seq_len
        out = np.empty((len(indices), T + 1), dtype=np.int64)  # (B, T + 1)
        for row, index in enumerate(indices):
            if not 0 <= index < self._len:
                raise IndexError(f"sequence {index} out of range (dataset has {self._len})")
            start = index * T
            number = int(self._ends.searchsorted(start, side="right"))
            if start + T + 1 <= self._ends[number]:
                local = start - int(self._starts[number])
                out[row] = self._shard(number)[local : local + T + 1]
            else:  # a window across shards: the general path
                item = self[index]
                out[row, :T], out[row, T] = item["input_ids"].numpy(), int(item["labels"][-1])
        windows = torch.from_numpy(out)
        if self._doc_starts is not None:
            return [self._item(w, i * T) for w, i in zip(windows, indices, strict=True)]
        return [{"input_ids": w[:-1], "labels": w[1:]} for w in windows]  # (T,), (T,) each

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
