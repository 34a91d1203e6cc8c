"""The one-line messages of the ``apt`` logger on the console, in the CLI and in library use.

``python -m apt train`` and ``Trainer(...).train()`` from a script print the same lines ("run
folder: ...", "run already complete ...", evaluations, checkpoints). In library use the handler
speaks only while the application has configured no logging of its own (the root logger has no
handler): configure logging and the ``apt`` lines go through yours instead, once. To silence
them: ``logging.getLogger("apt").setLevel(logging.WARNING)``.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["ConsoleHandler", "install_console_logging"]


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
