"""One split's token stream, written shard by shard so that an interrupted run can go on.

The open shard grows in a hidden partial file (``.<split>-NNNNN.bin.part``) and the document
offsets in another (``.<split>-docs.part``). When the shard is full it is flushed, fsync-ed and
renamed to ``<split>-NNNNN.bin``: under its final name a shard is always complete. The durable
state (:class:`SplitState`, kept in ``progress.json``) records how many tokens of the partial
files count; reopening a split truncates them to that, so whatever was appended after the last
record (and a shard renamed after it) is discarded and written again, identically.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from apt.core.errors import DataError
from apt.trainops.data.shards.index import ShardInfo, SplitInfo, docs_file, shard_file

__all__ = ["PARTIAL_SUFFIX", "SplitState", "SplitWriter", "fsync_folder"]

#: The suffix of the partial files of an unfinished preparation.
PARTIAL_SUFFIX = ".part"

_OFFSET = np.dtype("<i8")  # document offsets: int64, little-endian


@dataclass
class SplitState:
    """What of one split is done, as ``progress.json`` records it.

    Attributes:
        shards: the finished shards, in order.
        open_tokens: tokens of the open (next) shard already in its partial file.
        tokens: tokens of the split so far (finished shards and the open one).
        documents: documents of the split so far (offsets in the docs partial file).
        file_documents: documents of the split from each input, by input number.
    """

    shards: list[ShardInfo] = field(default_factory=list)
    open_tokens: int = 0
    tokens: int = 0
    documents: int = 0
    file_documents: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SplitState:
        return cls(
            shards=[ShardInfo(**s) for s in data["shards"]],
            open_tokens=int(data["open_tokens"]),
            tokens=int(data["tokens"]),
            documents=int(data["documents"]),
            file_documents=[int(n) for n in data["file_documents"]],
        )


def _partial(folder: Path, name: str) -> Path:
    return folder / f".{name}{PARTIAL_SUFFIX}"


def fsync_folder(folder: Path) -> None:
    """fsync a folder, so that the renames into it survive a crash of the machine."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reopen(path: Path, size: int, what: str) -> BinaryIO:
    """``path`` opened for appending after its first ``size`` bytes (the rest cut off)."""
    if not path.exists() and size == 0:
        path.touch()
    actual = path.stat().st_size if path.exists() else -1
    if actual < size:
        raise DataError(
            f"{path.parent}: the progress record counts {size} bytes of {what}, but "
            f"{path.name} {'is missing' if actual < 0 else f'has {actual}'}. The folder was "
            f"changed by something else; delete {path.parent} and prepare again."
        )
    fh = open(path, "r+b")  # noqa: SIM115 - kept open for appends until finish()
    fh.truncate(size)
    fh.seek(size)
    return fh


class SplitWriter:
    """Appends documents' tokens to one split, cutting shards of ``shard_tokens``.

    Args:
        folder: the output folder.
        split: ``train`` or ``val``.
        dtype: the shards' dtype (``uint16`` / ``uint32``), written little-endian.
        shard_tokens: tokens per shard (the last one of the split may hold fewer).
        state: where to go on from (a fresh :class:`SplitState` for a new preparation).

    Raises:
        DataError: the folder's files do not match ``state`` (a finished shard is missing or
            has another size, a partial file is short).
    """

    def __init__(
        self, folder: Path, split: str, *, dtype: np.dtype, shard_tokens: int, state: SplitState
    ) -> None:
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.state = state
        for shard in state.shards:
            path = folder / shard.file
            if not path.is_file() or path.stat().st_size != shard.tokens * self.dtype.itemsize:
                raise DataError(
                    f"{folder}: the progress record lists {shard.file} with {shard.tokens} "
                    "tokens, but the file is missing or has another size. Delete the folder "
                    "and prepare again."
                )
        number = len(state.shards)
        self._drop_shards_after(number)
        complete = folder / shard_file(split, number)
        if complete.exists():  # finished after the last record: it is rebuilt from the record
            os.replace(complete, self._open_path)
        self._shard = _reopen(self._open_path, state.open_tokens * self.dtype.itemsize, "tokens")
        self._hash = hashlib.sha256()
        self._shard.seek(0)
        while block := self._shard.read(1 << 24):
            self._hash.update(block)
        self._docs = _reopen(
            _partial(folder, docs_file(split)), state.documents * _OFFSET.itemsize, "offsets"
        )

    @property
    def _open_path(self) -> Path:
        return _partial(self.folder, shard_file(self.split, len(self.state.shards)))

    def _drop_shards_after(self, number: int) -> None:
        """Remove shards (final or partial) numbered above ``number``: written after the last
        record, they are written again."""
        for path in self.folder.glob(f"*{self.split}-*.bin*"):
            stem = path.name.lstrip(".").removesuffix(PARTIAL_SUFFIX).removesuffix(".bin")
            digits = stem.removeprefix(f"{self.split}-")
            if digits.isdigit() and int(digits) > number:
                path.unlink()

    def append(self, tokens: np.ndarray, lengths: np.ndarray, files: np.ndarray) -> bool:
        """Append documents: their tokens (end-of-text ids included), each one's token count
        and input number. Returns whether a shard was finished."""
        state = self.state
        if len(lengths):
            starts = np.empty(len(lengths), dtype=_OFFSET)
            starts[0] = state.tokens
            np.cumsum(lengths[:-1], out=starts[1:])
            starts[1:] += state.tokens
            self._docs.write(starts.tobytes())
            state.documents += len(lengths)
            numbers, counts = np.unique(files, return_counts=True)
            for number, count in zip(numbers.tolist(), counts.tolist(), strict=True):
                state.file_documents[number] += count
        data = tokens.astype(self.dtype, copy=False)
        finished, pos = False, 0
        while pos < len(data):
            piece = data[pos : pos + self.shard_tokens - state.open_tokens]
            buffer = piece.data.cast("B")
            self._shard.write(buffer)
            self._hash.update(buffer)
            state.open_tokens += len(piece)
            state.tokens += len(piece)
            pos += len(piece)
            if state.open_tokens == self.shard_tokens:
                self._close_shard()
                self._shard = open(self._open_path, "w+b")  # noqa: SIM115
                finished = True
        return finished

    def _close_shard(self) -> None:
        """Make the open shard durable and give it its final name."""
        state = self.state
        self._shard.flush()
        os.fsync(self._shard.fileno())
        self._shard.close()
        name = shard_file(self.split, len(state.shards))
        os.replace(self._open_path, self.folder / name)
        state.shards.append(ShardInfo(name, state.open_tokens, self._hash.hexdigest()))
        state.open_tokens = 0
        self._hash = hashlib.sha256()

    def sync(self) -> None:
        """Make what was appended durable (before the progress record counts it)."""
        for fh in (self._shard, self._docs):
            fh.flush()
            os.fsync(fh.fileno())

    def finish(self) -> SplitInfo:
        """Close the last shard (if it holds tokens) and write ``<split>-docs.npy``."""
        state = self.state
        if state.open_tokens:
            self._close_shard()
        else:
            self._shard.close()
            self._open_path.unlink(missing_ok=True)
        self._docs.flush()
        self._write_docs()
        return SplitInfo(
            shards=tuple(state.shards),
            tokens=state.tokens,
            documents=state.documents,
            docs_file=docs_file(self.split),
        )

    def _write_docs(self) -> None:
        """``<split>-docs.npy`` from the offsets file: an .npy header, then its bytes (streamed:
        a large corpus has more offsets than should be held in memory)."""
        final = self.folder / docs_file(self.split)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{final.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                header = {"descr": "<i8", "fortran_order": False, "shape": (self.state.documents,)}
                np.lib.format.write_array_header_1_0(out, header)
                self._docs.seek(0)
                while block := self._docs.read(1 << 24):
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._docs.close()

    def close(self) -> None:
        """Close the partial files (an interrupted run; they stay for the next one)."""
        self._shard.close()
        self._docs.close()
