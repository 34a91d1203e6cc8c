"""``kind: console``: one INFO line of the metrics per report, on the ``apt`` logger."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from apt.trainops.monitoring.base import MetricLogger, RunInfo

__all__ = ["ConsoleLogger", "format_metrics"]

log = logging.getLogger("apt")


def _format_value(value: float) -> str:
    """Four decimals in the range people read as is (losses, accuracies), else
    scientific notation (learning rates, token counts): ``2.3410``, ``3.00e-04``."""
    if isinstance(value, bool | int):
        return str(int(value))
    if not math.isfinite(value):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.2e}"


def format_metrics(metrics: dict[str, float], step: int) -> str:
    """``step 20: train_loss=2.3410, lr=3.00e-04`` (the metrics in the order given)."""
    values = ", ".join(f"{key}={_format_value(value)}" for key, value in metrics.items())
    return f"step {step}: {values}"


class ConsoleLogger(MetricLogger):
    """Logs one INFO line per report on the ``apt`` logger (rank 0's console)."""

    kind = "console"
    # Nothing is kept, so nothing needs dropping: a resumed run prints every step it trains.
    can_delete = True
    fix = 'check the handlers of the "apt" logger (logging.getLogger("apt"))'

    @classmethod
    def from_config(cls, cfg: Any, *, output_dir: Path) -> ConsoleLogger:
        """The console logger has no options."""
        return cls()

    def start(self, run: RunInfo) -> None:
        """Nothing to open."""

    def log_hparams(self, params: dict[str, Any]) -> None:
        """The config is not printed: it is in ``<run>/config.yaml``."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        log.info("%s", format_metrics(metrics, step))

    def finish(self) -> None:
        """Nothing to close."""
