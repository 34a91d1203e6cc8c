"""Each test gets the ``apt`` logger as it found it: its level, handlers and propagation."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture
def apt_logger() -> Iterator[logging.Logger]:
    """The ``apt`` logger at INFO (as the Trainer sets it on rank 0), restored afterwards."""
    logger = logging.getLogger("apt")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    logger.setLevel(logging.INFO)
    yield logger
    for handler in logger.handlers:
        if handler not in saved[1]:
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]
