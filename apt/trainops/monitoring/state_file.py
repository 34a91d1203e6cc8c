"""``<run>/monitoring.json``: what each logger needs to continue after a restart.

``{"wandb": {"run_id": "1x2y3z", "last_step": 50}, "jsonl": {"last_step": 50}, ...}``: per
logger kind, its :meth:`~apt.trainops.monitoring.base.MetricLogger.state_dict` and the last
step it logged. Rewritten atomically (a temporary file, then ``os.replace``) after every report,
so a kill leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["STATE_FILE", "read_state", "write_state"]

log = logging.getLogger("apt")

STATE_FILE = "monitoring.json"


def read_state(path: Path) -> dict[str, dict[str, Any]]:
    """The saved state by logger kind; ``{}`` when the file is missing, and ``{}`` with a
    warning when it cannot be read (each logger then starts a new run of its store)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning(
            "%s cannot be read (%s); the metric loggers start new runs (W&B, MLflow) instead "
            "of continuing the previous ones",
            path,
            exc,
        )
        return {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        log.warning(
            "%s is not a mapping of logger kinds to states; the metric loggers start new "
            "runs (W&B, MLflow) instead of continuing the previous ones",
            path,
        )
        return {}
    return data


def write_state(path: Path, state: dict[str, dict[str, Any]]) -> None:
    """Replace ``path`` with ``state`` as JSON, atomically.

    Raises:
        OSError: the run folder cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
