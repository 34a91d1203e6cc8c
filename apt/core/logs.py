"""The one-line messages of the ``apt`` logger on the console, in the CLI and in library use.

``python -m apt train`` and ``Trainer(...).train()`` from a script print the same lines ("run
folder: ...", "run already complete ...", evaluations, checkpoints). In library use the handler
speaks only while the application has configured no logging of its own (the root logger has no
handler): configure logging and the ``apt`` lines go through yours instead, once. To silence
them: ``logging.getLogger("apt").setLevel(logging.WARNING)``.

A run also keeps its lines in ``<run folder>/logs/train.log`` (:func:`attach_file_log`, rank 0),
with a timestamp and level on each. The console handler and the file handler pass every record
through :class:`RedactFilter` first, so neither the terminal nor the file ever shows a URI
password or a ``token=...`` parameter (:func:`apt.core.redact.redact`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from apt.core.redact import redact

__all__ = [
    "ConsoleHandler",
    "RedactFilter",
    "RunFileHandler",
    "attach_file_log",
    "detach_file_log",
    "install_console_logging",
]

#: The line format of ``logs/train.log``: ``2025-06-01 10:02:11,042 INFO apt: run folder: ...``.
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactFilter(logging.Filter):
    """Hides credentials in a record before any handler formats it (never drops a record).

    The message is rendered with its arguments and passed through :func:`redact`, and so are
    the traceback and stack text; the record is changed in place, so the handlers after this
    one (the application's, through propagation) get the redacted record too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit the format: drop them, unseen
            message = f"{record.msg} (its arguments {type(record.args).__name__} did not fit)"
        record.msg, record.args = redact(message), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class ConsoleHandler(logging.Handler):
    """Writes records to stderr through tqdm, so they do not tear a progress bar.

    Args:
        always: write even when the root logger has handlers (the CLI, which owns the
            process's logging); otherwise leave the record to them.
    """

    def __init__(self, always: bool = False) -> None:
        super().__init__()
        self.always = always
        self.setFormatter(logging.Formatter("%(message)s"))
        self.addFilter(RedactFilter())

    def emit(self, record: logging.LogRecord) -> None:
        if not self.always and logging.getLogger().handlers:
            return  # the application logs: the record reaches its handlers by propagation
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def install_console_logging(*, main: bool, always: bool = False) -> None:
    """Give the ``apt`` logger a :class:`ConsoleHandler`, once.

    Args:
        main: this process is rank 0: INFO lines are shown; other ranks show warnings only.
        always: the CLI's setting (see :class:`ConsoleHandler`); the ``apt`` logger then stops
            propagating, so no line is printed twice.
    """
    logger = logging.getLogger("apt")
    if any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        return
    if logger.handlers and not always:
        return  # the application set the apt logger up itself
    logger.addHandler(ConsoleHandler(always=always))
    if logger.level == logging.NOTSET or always:
        logger.setLevel(logging.INFO if main else logging.WARNING)
    if always:
        logger.propagate = False


class RunFileHandler(logging.FileHandler):
    """The handler of a run's ``logs/train.log`` (appends; :func:`attach_file_log`)."""


def attach_file_log(path: str | Path) -> RunFileHandler:
    """Append the ``apt`` logger's records to ``path`` (its folder is created), redacted, with
    a timestamp and level on each line, until :func:`detach_file_log`.

    The file gets the records the ``apt`` logger lets through (INFO and up on rank 0 once
    :func:`install_console_logging` ran, unless you set the logger's level). A handler of the
    same file attached before and never detached (a Trainer that was not closed) is replaced,
    so no line is written twice.

    Raises:
        OSError: the folder or the file cannot be created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = RunFileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.addFilter(RedactFilter())
    logger = logging.getLogger("apt")
    for old in [h for h in logger.handlers if isinstance(h, RunFileHandler)]:
        if old.baseFilename == handler.baseFilename:
            detach_file_log(old)
    logger.addHandler(handler)
    return handler


def detach_file_log(handler: logging.Handler) -> None:
    """Remove ``handler`` from the ``apt`` logger and close its file (a no-op the second
    time)."""
    logging.getLogger("apt").removeHandler(handler)
    handler.close()
