"""Where a run's metrics go: ``metrics.jsonl`` always, plus console, TensorBoard, W&B, MLflow.

:func:`build_monitor` turns the ``monitoring`` section into a :class:`Monitor`, the one object
the Trainer reports to (rank 0); each logger keeps the :class:`MetricLogger` contract and is
chosen by ``kind`` through :data:`LOGGERS`. A resumed run continues each store without a step
twice (``<run>/monitoring.json`` keeps what they need), and a logger that fails is switched
off with one warning while training goes on. :mod:`~apt.trainops.monitoring.flops` estimates
MFU. Importing this package imports none of tensorboard, wandb, mlflow or torch.
"""

from apt.trainops.monitoring.base import MetricLogger, RunInfo
from apt.trainops.monitoring.console import ConsoleLogger, format_metrics
from apt.trainops.monitoring.errors import MonitoringError
from apt.trainops.monitoring.flops import (
    PEAK_FLOPS,
    flops_per_token,
    lookup_peak_flops,
    mfu,
    multiplying_parameters,
    peak_flops,
)
from apt.trainops.monitoring.hub import Monitor, build_monitor
from apt.trainops.monitoring.jsonl import JsonlLogger, read_jsonl
from apt.trainops.monitoring.mlflow_logger import MLflowLogger
from apt.trainops.monitoring.registry import LOGGERS, build_logger
from apt.trainops.monitoring.state_file import STATE_FILE, read_state
from apt.trainops.monitoring.tensorboard import TensorBoardLogger
from apt.trainops.monitoring.wandb_logger import WandbLogger

__all__ = [
    "LOGGERS",
    "PEAK_FLOPS",
    "STATE_FILE",
    "ConsoleLogger",
    "JsonlLogger",
    "MLflowLogger",
    "MetricLogger",
    "Monitor",
    "MonitoringError",
    "RunInfo",
    "TensorBoardLogger",
    "WandbLogger",
    "build_logger",
    "build_monitor",
    "flops_per_token",
    "format_metrics",
    "lookup_peak_flops",
    "mfu",
    "multiplying_parameters",
    "peak_flops",
    "read_jsonl",
    "read_state",
]
