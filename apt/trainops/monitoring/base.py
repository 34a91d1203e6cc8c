"""The contract every metric logger (console, metrics.jsonl, TensorBoard, W&B, MLflow) keeps.

The :class:`~apt.trainops.monitoring.hub.Monitor` calls one logger in this order, rank 0 only::

    logger.start(RunInfo(run_dir, name, start_step, saved))   # saved: state of an earlier process
    logger.log_hparams(redacted_config)                       # only when ``saved`` is empty
    for each report:  logger.log(metrics, step)
                      logger.state_dict()                     # kept in <run>/monitoring.json
    logger.finish()                                           # not reached after a kill

A resumed run starts at the step of its checkpoint, so the points a killed process logged after
that step are logged again, with new values. A logger that can forget points (``can_delete``:
metrics.jsonl rewrites its file, TensorBoard hides them with ``purge_step``) drops them in
:meth:`MetricLogger.start`; for the others (W&B, MLflow) the Monitor skips the steps they
already hold, so every store keeps strictly increasing steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["MetricLogger", "RunInfo"]


@dataclass(frozen=True)
class RunInfo:
    """What a logger is told when the run starts.

    Attributes:
        run_dir: the run folder, ``<output_dir>/<experiment_name>``.
        name: the experiment name (the default run name of W&B and MLflow).
        start_step: the step training starts from: 0 for a new run, the step of the
            checkpoint it resumes from otherwise.
        saved: what this logger's :meth:`MetricLogger.state_dict` returned in an earlier
            process of the same run (``{}`` when there was none).
    """

    run_dir: Path
    name: str
    start_step: int
    saved: dict[str, Any]

    @property
    def resumed(self) -> bool:
        """An earlier process of this run logged here, or training resumes a checkpoint."""
        return bool(self.saved) or self.start_step > 0


class MetricLogger(ABC):
    """A place the run's metrics go; the registry builds one per ``monitoring.loggers`` entry.

    Attributes:
        kind: the name it is chosen by in ``monitoring.loggers`` (``kind: tensorboard``).
        can_delete: True when :meth:`start` itself drops the points logged after
            ``start_step`` by a killed process; False makes the Monitor skip the steps this
            logger already holds instead.
        fix: one line telling the user what to check when this logger fails (shown in the
            Monitor's warning).
    """

    kind: ClassVar[str]
    can_delete: ClassVar[bool] = False
    fix: ClassVar[str]

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: Any, *, output_dir: Path) -> MetricLogger:
        """Build the logger from its ``monitoring.loggers`` entry (nothing is opened yet).

        Args:
            cfg: the entry, of this logger's config class.
            output_dir: ``artifacts.output_dir``, the folder of every run folder.
        """

    @abstractmethod
    def start(self, run: RunInfo) -> None:
        """Open the store (a file, a writer, a tracking run); this is where the logger's
        package is imported.

        Raises:
            Exception: anything the backend raises (package missing, server unreachable,
                folder unwritable); the Monitor warns once and switches the logger off.
        """

    @abstractmethod
    def log_hparams(self, params: dict[str, Any]) -> None:
        """Record the run's resolved config: a nested mapping of JSON values, secrets already
        hidden; called once per logger run, right after :meth:`start` of a new one."""

    @abstractmethod
    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` at optimizer step ``step`` (values may be NaN or infinite)."""

    @abstractmethod
    def finish(self) -> None:
        """Write what is buffered and close the store; a no-op when :meth:`start` did not
        succeed."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed process needs to continue this logger's store (JSON values, no
        secret); ``{}`` when it needs nothing."""
        return {}
