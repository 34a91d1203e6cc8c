"""Make this folder's helpers (dist_workload, dist_contract, dist_worker) importable.

pytest runs with ``--import-mode=importlib``, which does not put test folders on ``sys.path``;
the torchrun workers import the same helpers by path, so they live here as plain modules.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
