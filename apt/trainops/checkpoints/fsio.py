"""Durable file writes: hashed while written, fsynced, recorded for the manifest.

Every byte of a checkpoint goes through :class:`StageFiles`, which writes into the stage folder,
computes size and sha256 in the same pass (no second read), fsyncs each file and remembers the
record. Files written by someone else (another rank, ``torch.distributed.checkpoint``) are hashed
from disk when the manifest is built.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from apt.trainops.checkpoints import faults

__all__ = [
    "FileRecord",
    "StageFiles",
    "atomic_write_text",
    "dumps_json",
    "fsync_dir",
    "hash_file",
]

_CHUNK = 16 << 20
_PIPELINE_MIN = 1 << 20


@dataclass(frozen=True)
class FileRecord:
    """Size and sha256 of one checkpoint file."""

    size: int
    sha256: str


def dumps_json(obj: Any) -> bytes:
    """Deterministic JSON (sorted keys, indented), so equal states give equal bytes."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def fsync_dir(path: Path) -> None:
    """fsync a folder so a rename or a new entry inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_file(path: Path) -> FileRecord:
    """Size and sha256 of ``path``, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileRecord(size=size, sha256=digest.hexdigest())


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: write a temporary file, fsync, rename, fsync."""
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class _HashingWriter:
    """A write-only file object that hashes what passes through (``torch.save`` accepts it).

    Large buffers are hashed in a helper thread, chunk by chunk, while the same chunk is written
    (both release the GIL), so a save costs max(write, sha256) rather than their sum.
    """

    def __init__(self, fh: IO[bytes], path: Path, step: int, pool: ThreadPoolExecutor) -> None:
        self._fh, self._path, self._step, self._pool = fh, path, step, pool
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        if self.size == 0:
            faults.maybe_raise_enospc(str(self._path), self._step)
        view = memoryview(data).cast("B")
        for start in range(0, view.nbytes, _CHUNK):
            chunk = view[start : start + _CHUNK]
            if chunk.nbytes < _PIPELINE_MIN:
                self._fh.write(chunk)
                self._digest.update(chunk)
                continue
            hashed = self._pool.submit(self._digest.update, chunk)
            try:
                self._fh.write(chunk)
            finally:
                hashed.result()  # updates stay in order: one chunk in flight
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._fh.flush()

    def record(self) -> FileRecord:
        return FileRecord(size=self.size, sha256=self._digest.hexdigest())


class StageFiles:
    """Writes the files of one checkpoint into its stage folder.

    Args:
        root: the stage folder (``<save_dir>/.tmp-step-...``).
        step: the step being saved (fault points fire per step).
        in_background: this save runs in the async writer thread (arms ``kill_in_async_write``).
    """

    def __init__(self, root: Path, step: int, *, in_background: bool = False) -> None:
        self.root = root
        self.step = step
        self.in_background = in_background
        self.records: dict[str, FileRecord] = {}

    def write(self, rel: str, fill: Callable[[Any], None]) -> Path:
        """Create ``root/rel``, let ``fill(fileobj)`` write it, fsync; return the path.

        ``fileobj`` has ``write`` and ``flush``, so ``torch.save(obj, fileobj)`` works.
        """
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(1, thread_name_prefix="apt-sha256") as pool, open(path, "wb") as fh:
            writer = _HashingWriter(fh, path, self.step, pool)
            fill(writer)
            fh.flush()
            os.fsync(fh.fileno())
        self.records[rel] = writer.record()
        if self.in_background:
            faults.maybe_kill("kill_in_async_write", self.step)
        return path

    def write_bytes(self, rel: str, data: bytes) -> Path:
        """Write ``data`` to ``root/rel`` (see :meth:`write`)."""
        return self.write(rel, lambda fh: fh.write(data))

    def add_records(self, records: dict[str, FileRecord]) -> None:
        """Take the records of files written without :meth:`write` (another rank hashed them
        as it wrote), so the manifest need not read them again."""
        self.records.update(records)

    def all_records(self) -> dict[str, FileRecord]:
        """Every file under the stage folder; files written elsewhere are hashed from disk."""
        out: dict[str, FileRecord] = {}
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            rel = path.relative_to(self.root).as_posix()
            out[rel] = self.records.get(rel) or hash_file(path)
        return out

    def fsync_tree(self) -> None:
        """fsync every folder of the stage (new entries are durable before the rename)."""
        for folder in sorted({p.parent for p in self.root.rglob("*")} | {self.root}):
            fsync_dir(folder)
