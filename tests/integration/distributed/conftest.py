"""Make this folder's helpers (dist_workload, dist_contract, dist_worker) importable, and
train the one-process run the strategy tests compare with once per session.

pytest runs with ``--import-mode=importlib``, which does not put test folders on ``sys.path``;
the torchrun workers import the same helpers by path, so they live here as plain modules.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import pytest  # noqa: E402 (after the path above: trainer_runs imports this folder's helpers)
import trainer_runs as tr  # noqa: E402


@pytest.fixture(scope="session")
def one_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder holding the one-process run of 10 steps (trained at first use)."""
    work = tmp_path_factory.mktemp("one_process")
    tr.train_one_process_run(work)
    return work
