"""Checkpoint file I/O: durable hashed writes, and reads confined to the checkpoint folder.

Every byte of a checkpoint goes through :class:`StageFiles`, which writes into the stage folder,
computes size and sha256 in the same pass (no second read), fsyncs each file and remembers the
record. Files written by someone else (another rank, ``torch.distributed.checkpoint``) are hashed
from disk when the manifest is built.

Every byte read back goes through :func:`open_inside`: a path relative to the checkpoint folder,
without ``..``, absolute or empty parts, whose every component is a real folder (not a symbolic
link) and whose last one is a regular file, opened with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO
cannot hang the reader) and checked again on the open descriptor. Anything else is refused with
a :class:`~apt.core.errors.CheckpointError` naming the file and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

from apt.core.errors import CheckpointError
from apt.trainops.checkpoints import faults

__all__ = [
    "FileRecord",
    "StageFiles",
    "atomic_write_text",
    "check_relpath",
    "dumps_json",
    "fsync_dir",
    "hash_file",
    "hash_inside",
    "lstat_inside",
    "open_inside",
    "read_inside",
    "refused",
]

_CHUNK = 16 << 20
_PIPELINE_MIN = 1 << 20
#: Opening the last component: never through a link, never blocking (a FIFO opens at once).
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)
_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


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


def refused(path: Path | str, why: str) -> CheckpointError:
    """The error for a checkpoint file that is not read: ``<path>: refused: <why>``."""
    return CheckpointError(
        f"{path}: refused: {why}. A checkpoint holds only regular files inside its own folder; "
        "this one was altered or not written by APT"
    )


def check_relpath(rel: Any) -> str | None:
    """Why ``rel`` cannot name a file inside a checkpoint folder, or None when it can.

    Accepted: ``a/b/c`` with no empty, ``.`` or ``..`` part, not absolute, no NUL or backslash.
    """
    if not isinstance(rel, str) or not rel:
        return f"the path {rel!r} is not a non-empty string"
    if "\x00" in rel or "\\" in rel:
        return f"the path {rel!r} holds a NUL or a backslash"
    if rel.startswith("/"):
        return f"the path {rel!r} is absolute"
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return f"the path {rel!r} has an empty, '.' or '..' part (it could leave the folder)"
    return None


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def lstat_inside(root: Path, rel: str) -> os.stat_result:
    """The ``lstat`` of ``root/rel`` after checking it is a regular file inside ``root``.

    Every component below ``root`` is looked at without following links; ``root`` itself is
    taken as given (its callers decide whether it may be a link).

    Raises:
        CheckpointError: a bad path, a symbolic link (the file or a folder on the way), or not
            a regular file (a folder, a FIFO, a device).
        FileNotFoundError: ``root/rel`` (or a folder on the way) does not exist.
    """
    why = check_relpath(rel)
    if why is not None:
        raise refused(root / str(rel), why)
    parts = rel.split("/")
    here = root
    for depth, name in enumerate(parts, start=1):
        here = here / name
        st = os.lstat(here)
        if stat.S_ISLNK(st.st_mode):
            where = "is" if depth == len(parts) else f"its folder {'/'.join(parts[:depth])} is"
            raise refused(root / rel, f"{where} a symbolic link (to {os.readlink(here)!r})")
        if depth < len(parts) and not stat.S_ISDIR(st.st_mode):
            raise refused(root / rel, f"{'/'.join(parts[:depth])} is {_kind(st.st_mode)}")
    if not stat.S_ISREG(st.st_mode):
        raise refused(root / rel, f"it is {_kind(st.st_mode)}, not a regular file")
    return st


@contextmanager
def open_inside(root: Path, rel: str) -> Iterator[BinaryIO]:
    """Open ``root/rel`` for reading, only if it is a regular file inside ``root``.

    The checks of :func:`lstat_inside` are made again on the open descriptor (``O_NOFOLLOW``,
    ``fstat``: still the same regular file), so a file swapped for a link or a FIFO between the
    check and the open is refused too; a folder on the way swapped in that instant is not
    detected (the checkpoint folder is the user's own, not shared with an attacker).

    Raises:
        CheckpointError: as :func:`lstat_inside`, or the file changed while being opened.
        FileNotFoundError: the file does not exist.
    """
    before = lstat_inside(root, rel)
    try:
        fd = os.open(root / rel, _OPEN_FLAGS)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP: it became a link
        raise refused(root / rel, f"cannot be opened safely ({exc.strerror})") from None
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (
            before.st_dev,
            before.st_ino,
        ):
            raise refused(root / rel, "it changed while being opened")
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


def read_inside(root: Path, rel: str, *, limit: int) -> bytes:
    """The bytes of ``root/rel`` (see :func:`open_inside`), refused above ``limit`` bytes.

    Raises:
        CheckpointError: refused (see :func:`open_inside`), or larger than ``limit``.
        FileNotFoundError: the file does not exist.
    """
    with open_inside(root, rel) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise refused(root / rel, f"it is {size} bytes, more than the {limit} this file may be")
        return fh.read(limit + 1)


def hash_inside(root: Path, rel: str, *, expected_size: int | None = None) -> FileRecord:
    """Size and sha256 of ``root/rel`` (see :func:`open_inside`), read in chunks.

    With ``expected_size``, a file of another size is not hashed (its record has an empty hash).
    """
    with open_inside(root, rel) as fh:
        size = os.fstat(fh.fileno()).st_size
        if expected_size is not None and size != expected_size:
            return FileRecord(size=size, sha256="")
        digest = hashlib.sha256()
        size = 0
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
