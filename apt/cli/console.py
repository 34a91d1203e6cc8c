"""Console streams that survive their reader going away.

``python -m apt train ... | tee log`` and a Ctrl-C to the terminal end ``tee`` too; from then on
every write to stdout/stderr fails with ``EPIPE``. A progress bar or a log line must not turn
that into an exception that ends the run before its exit save. Once a stream's reader is gone,
:class:`GuardedStream` drops what is written to it (there is no one left to read it) and points
the file descriptor at ``/dev/null``, so that nothing at interpreter exit fails on it either.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any, TextIO

__all__ = ["GuardedStream", "guard_console"]


class GuardedStream:
    """A text stream whose writes and flushes stop at the first broken pipe.

    Args:
        stream: the stream to guard (``sys.stdout`` or ``sys.stderr``).
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if self.broken:
            return len(text)
        try:
            return self._stream.write(text)
        except OSError as exc:
            return self._gone(exc, len(text))

    def flush(self) -> None:
        if self.broken:
            return
        try:
            self._stream.flush()
        except OSError as exc:
            self._gone(exc, 0)

    def _gone(self, exc: OSError, written: int) -> int:
        if exc.errno not in (errno.EPIPE, errno.EINVAL) and not isinstance(exc, BrokenPipeError):
            raise exc
        self.broken = True
        try:  # what is still buffered would fail again when Python flushes it at exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass  # no descriptor behind the stream (a test's StringIO): nothing to redirect
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def guard_console() -> None:
    """Guard ``sys.stdout`` and ``sys.stderr`` (idempotent)."""
    if not isinstance(sys.stdout, GuardedStream):
        sys.stdout = GuardedStream(sys.stdout)  # type: ignore[assignment]
    if not isinstance(sys.stderr, GuardedStream):
        sys.stderr = GuardedStream(sys.stderr)  # type: ignore[assignment]
