"""The metric loggers by ``kind``, and :func:`build_logger`.

Entries are import paths, imported when a logger of that kind is built; even then a backend's
package (tensorboard, wandb, mlflow) is imported only when the logger starts, so a run that
does not choose it never imports it.
"""

from __future__ import annotations

from pathlib import Path

from apt.core.config.monitoring import LoggerConfig
from apt.core.registry import Registry
from apt.trainops.monitoring.base import MetricLogger

__all__ = ["LOGGERS", "build_logger"]

_HOME = "apt.trainops.monitoring"

#: Metric loggers by the ``kind`` of their ``monitoring.loggers`` entry.
LOGGERS: Registry[type[MetricLogger]] = Registry(
    "metric logger",
    lazy={
        "console": f"{_HOME}.console:ConsoleLogger",
        "jsonl": f"{_HOME}.jsonl:JsonlLogger",
        "tensorboard": f"{_HOME}.tensorboard:TensorBoardLogger",
        "wandb": f"{_HOME}.wandb_logger:WandbLogger",
        "mlflow": f"{_HOME}.mlflow_logger:MLflowLogger",
    },
)


def build_logger(cfg: LoggerConfig, *, output_dir: Path) -> MetricLogger:
    """The logger a ``monitoring.loggers`` entry describes (not started).

    Args:
        cfg: one entry of ``MonitoringConfig.loggers`` (its ``kind`` picks the class).
        output_dir: ``artifacts.output_dir`` (the default MLflow store lives there).

    Raises:
        ConfigError: no logger is registered under ``cfg.kind`` (the valid kinds are listed).
    """
    return LOGGERS.get(cfg.kind).from_config(cfg, output_dir=Path(output_dir))
