"""The on-disk format of prepared token shards (``python -m apt data prepare``).

A prepared folder holds, per split (``train``, ``val``):

* ``<split>-NNNNN.bin``: raw token ids (no header) of the index's ``dtype``, little-endian,
  ``shard_tokens`` ids each except the last shard of the split. The shards of a split, in
  order, are one token stream: every document's tokens followed by the tokenizer's ``eos_id``.
* ``<split>-docs.npy``: int64 offsets in that stream where each document starts (sorted,
  first 0), for document-aware attention masks.
* ``index.json``: this module's :class:`ShardIndex`, written last and atomically. A folder
  without it is an unfinished preparation, never a dataset.

Every file is written to a temporary name in the folder, flushed to disk and renamed into place,
so a file under its final name is complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apt.core.errors import DataError

__all__ = [
    "INDEX_FILE",
    "SHARD_FORMAT",
    "InputFile",
    "ShardIndex",
    "ShardInfo",
    "SplitInfo",
    "TokenizerInfo",
    "atomic_write_bytes",
    "docs_file",
    "read_index",
    "shard_file",
    "write_index",
]

INDEX_FILE = "index.json"
#: Name and version of the format; bump the version when a reader would misread older folders.
SHARD_FORMAT: dict[str, Any] = {"name": "apt-token-shards", "version": 1}


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: its name in the folder, its token count, the sha256 of its bytes."""

    file: str
    tokens: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    """The shards of one split, in stream order, and its totals."""

    shards: tuple[ShardInfo, ...]
    tokens: int
    documents: int
    docs_file: str


@dataclass(frozen=True)
class TokenizerInfo:
    """What made the ids: the ``data.tokenizer`` spec, its size, end-of-text id, fingerprint."""

    spec: dict[str, Any]
    vocab_size: int
    eos_id: int
    fingerprint: str


@dataclass(frozen=True)
class InputFile:
    """One input file: its path as given, its size in bytes, the documents read from it."""

    path: str
    bytes: int
    documents: int


@dataclass(frozen=True)
class ShardIndex:
    """Everything a reader needs, and what a re-run checks before reusing finished shards."""

    dtype: str  # "uint16" or "uint32"
    shard_tokens: int
    tokenizer: TokenizerInfo
    splits: dict[str, SplitInfo]
    inputs: tuple[InputFile, ...]
    val_fraction: float
    text_field: str
    format: dict[str, Any] = field(default_factory=lambda: dict(SHARD_FORMAT))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardIndex:
        splits = {
            name: SplitInfo(
                shards=tuple(ShardInfo(**s) for s in split["shards"]),
                tokens=split["tokens"],
                documents=split["documents"],
                docs_file=split["docs_file"],
            )
            for name, split in data["splits"].items()
        }
        return cls(
            dtype=data["dtype"],
            shard_tokens=data["shard_tokens"],
            tokenizer=TokenizerInfo(**data["tokenizer"]),
            splits=splits,
            inputs=tuple(InputFile(**i) for i in data["inputs"]),
            val_fraction=data["val_fraction"],
            text_field=data["text_field"],
            format=data["format"],
        )


def shard_file(split: str, number: int) -> str:
    """The file name of shard ``number`` of ``split``."""
    return f"{split}-{number:05d}.bin"


def docs_file(split: str) -> str:
    """The file name of the document offsets of ``split``."""
    return f"{split}-docs.npy"


def atomic_write_bytes(path: Path, data: bytes | np.ndarray) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(data, np.ndarray):
                data.tofile(out)
            else:
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_index(folder: Path, index: ShardIndex) -> None:
    """Write ``index.json`` (atomically: the folder becomes a dataset in one rename)."""
    atomic_write_bytes(folder / INDEX_FILE, index.to_json().encode())


def read_index(folder: str | Path, *, key: str = "data.source.path") -> ShardIndex:
    """The index of a prepared folder.

    Raises:
        DataError: no folder, no ``index.json`` (an unfinished preparation), a malformed index,
            or one written by a newer format version; the message names the folder and ``key``.
    """
    folder = Path(folder).expanduser()
    path = folder / INDEX_FILE
    if not folder.is_dir():
        raise DataError(
            f"{key}: {folder} is not a folder of prepared shards. Make one with "
            f"`python -m apt data prepare --input ... --output {folder}`."
        )
    if not path.is_file():
        raise DataError(
            f"{key}: {folder} has no {INDEX_FILE}: its preparation did not finish. Run the same "
            "`python -m apt data prepare` command again to complete it."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        index = ShardIndex.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{key}: {path} cannot be read as a shard index ({exc}). Prepare the folder again."
        ) from None
    if index.format.get("name") != SHARD_FORMAT["name"]:
        raise DataError(f"{key}: {path} is not an APT shard index (format {index.format}).")
    if int(index.format.get("version", 0)) > int(SHARD_FORMAT["version"]):
        raise DataError(
            f"{key}: {path} has shard format version {index.format['version']}; this APT reads "
            f"up to {SHARD_FORMAT['version']}. Upgrade APT or prepare the folder again."
        )
    return index
