"""The run lock: one process at a time trains into a folder.

``<folder>/.lock`` names its holder while the holder keeps an exclusive ``flock`` on it::

    {"host": "node-3", "pid": 41234, "started": "2025-06-01T10:02:11+02:00"}

The kernel drops a ``flock`` when its holder ends, however it ends (SIGKILL, OOM kill), so the
lock is never stale while it is held, and a lock file whose ``flock`` can be taken is stale:
the process it names is gone. Such a file is taken over, with a log line. A held lock refuses
with :class:`RunLockedError` naming its holder. Releasing removes the file (while still
holding it), so a folder whose run ended cleanly has no ``.lock``.

Whoever takes the lock checks, once it holds it, that the file it locked is still the one at
``<folder>/.lock`` (a releasing holder may have removed it, or ``--new-run`` moved the folder);
if not, it locks the file now there. A forked child (a DataLoader worker) closes its copy of
the descriptor at once, so a killed run's workers, which take a moment to notice, never keep
its folder locked. On a filesystem without ``flock`` the lock falls back to the pid it names: a
holder alive on this host, or any holder on another host, refuses.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
import weakref
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from apt.trainops.artifacts.errors import RunFolderError, RunLockedError

__all__ = ["LOCK_NAME", "RunLock"]

log = logging.getLogger("apt")

LOCK_NAME = ".lock"
#: flock errors that mean "this filesystem cannot flock", not "someone holds it".
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}
_ATTEMPTS = 10  # each one lost only to a holder that released or moved the file meanwhile

#: The locks this process holds. A flock belongs to the open file, which a fork shares: the
#: fork hook below is process-wide by nature, so this registry is too.
_HELD: weakref.WeakSet[RunLock] = weakref.WeakSet()


def _drop_in_child() -> None:
    """In a forked child: close the descriptors of the parent's locks (they stay held by the
    parent), so that only the parent's own end releases them."""
    for lock in list(_HELD):
        if lock._fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock._fd)
            lock._fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_in_child)


class RunLock:
    """An exclusive lock on ``folder`` held by this process (see the module docstring).

    Args:
        folder: the folder to lock; it must exist.
        what: how messages name the folder ("run folder", "checkpoint folder").
        key: the config key that picks another folder (for the message that refuses).
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        what: str = "run folder",
        key: str = "artifacts.experiment_name",
    ) -> None:
        self.folder = Path(folder)
        self.what, self.key = what, key
        self._fd: int | None = None
        self._owner = os.getpid()  # a forked child (DataLoader worker) never releases it
        #: The holder is training now; an idle holder in this process (a Trainer built and
        #: not trained, or trained and not closed) hands the lock over to a new one.
        self.busy = False

    @property
    def path(self) -> Path:
        """The lock file."""
        return self.folder / LOCK_NAME

    @property
    def held(self) -> bool:
        """This object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (a no-op when held already).

        Raises:
            RunLockedError: another live process holds it (its host, pid and start time named).
            OSError: the lock file cannot be created (the caller names the folder's key).
        """
        if self._fd is not None:
            return
        if self._take_from_idle_holder():
            return
        for _ in range(_ATTEMPTS):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                previous = self._take(fd)
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # released (removed) or moved while we took it: lock the one there now
        else:
            raise RunFolderError(
                f"{self.path}: the lock file was replaced {_ATTEMPTS} times while this process "
                f"took it; is another program removing it? Check {self.folder}."
            )
        if previous:
            log.info(
                "%s %s: took over the lock of %s, which ended without releasing it",
                self.what,
                self.folder,
                _describe(previous),
            )
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)  # a full disk: the lock must not stay held by a lost descriptor
            raise
        self._fd = fd
        _HELD.add(self)

    def follow(self, folder: str | Path) -> None:
        """The holder renamed the folder (``--new-run``): the lock file is now in ``folder``."""
        self.folder = Path(folder)

    def release(self) -> None:
        """Remove the lock file and drop the lock (a no-op when not held)."""
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        if fd is None or os.getpid() != self._owner:
            return
        try:
            if _same_file(fd, self.path):  # still ours: removed before the flock is dropped
                self.path.unlink()
        except OSError as exc:
            log.debug("could not remove %s: %s", self.path, exc)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()

    # ------------------------------------------------------------------ internals
    def _take_from_idle_holder(self) -> bool:
        """Take over the lock from another holder of the same file in this process that is
        not training (a notebook cell run twice builds a second Trainer of the same folder
        while the first still exists); that holder no longer holds it."""
        for other in list(_HELD):
            fd = other._fd
            if other is self or fd is None or other.busy or not _same_file(fd, self.path):
                continue
            other._fd = None
            _HELD.discard(other)
            self._fd = fd
            _HELD.add(self)
            log.debug("%s %s: lock handed over within this process", self.what, self.folder)
            return True
        return False

    def _take(self, fd: int) -> dict[str, Any]:
        """flock ``fd``; return the holder the file names (a stale one, when not empty)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._refusal(_read_holder(fd, wait=True)) from None
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                raise
            holder = _read_holder(fd)
            if holder and not _gone(holder):
                raise self._refusal(holder) from None
            log.warning(
                "%s: the filesystem cannot flock (%s); the run lock relies on the pid in %s",
                self.folder,
                exc.strerror,
                self.path,
            )
            return holder
        return _read_holder(fd)

    def _refusal(self, holder: dict[str, Any]) -> RunLockedError:
        here = holder.get("host") == socket.gethostname()
        pid = holder.get("pid")
        if not holder:
            who = "another process, which is just starting (it has not written its name yet)"
        elif here and pid == os.getpid():
            who = (
                "this process: another Trainer of the same folder is training (let its train() "
                "end first)"
            )
        elif here and isinstance(pid, int) and not _alive(pid):
            who = (
                f"{_describe(holder)}; that process has exited, but a process it started (a "
                f"DataLoader worker?) still holds the lock: end it (fuser {self.path})"
            )
        else:
            who = f"{_describe(holder)}; wait for it to end, or stop it (kill {pid}"
            who += ")" if here else f" on {holder.get('host')})"
        return RunLockedError(
            f"the {self.what} {self.folder} is in use by another run: {who}. Lock file: "
            f"{self.path}. To train another run at the same time, choose another {self.key}.",
            path=self.path,
            holder=holder,
        )


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_holder(fd: int, *, wait: bool = False) -> dict[str, Any]:
    """The JSON record in the lock file ({} when empty or unreadable). ``wait``: a holder that
    has just taken the lock writes its record a moment later; give it half a second."""
    deadline = time.monotonic() + (0.5 if wait else 0.0)
    while True:
        try:
            data = json.loads(os.pread(fd, 4096, 0) or b"null")
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) or time.monotonic() >= deadline:
            return data if isinstance(data, dict) else {}
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _gone(holder: dict[str, Any]) -> bool:
    """Without flock: the holder is known to be gone (this host, a pid no longer running)."""
    pid = holder.get("pid")
    here = holder.get("host") == socket.gethostname()
    return here and isinstance(pid, int) and pid != os.getpid() and not _alive(pid)


def _describe(holder: dict[str, Any]) -> str:
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
        f"since {holder.get('started', '?')}"
    )
