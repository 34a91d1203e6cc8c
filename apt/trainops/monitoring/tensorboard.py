"""``kind: tensorboard``: TensorBoard event files, ``<run>/tensorboard`` by default.

A resumed run opens its writer with ``purge_step = start_step + 1``: TensorBoard then hides
every point an earlier process wrote at or after that step, so the steps trained again show
once, with their new values. The writer is flushed after every report, so a killed run keeps
every point its checkpoint covers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from apt.trainops.monitoring.base import MetricLogger, RunInfo
from apt.trainops.monitoring.params import flatten_params

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["TensorBoardLogger"]

_SCALAR = (bool, int, float, str)


class TensorBoardLogger(MetricLogger):
    """Writes each metric as a TensorBoard scalar, and the config as text and HParams.

    Args:
        log_dir: the folder of the event files (None: ``<run>/tensorboard``).
        flush_seconds: the writer writes its buffer to disk at least this often.
    """

    kind = "tensorboard"
    can_delete = True
    fix = "check that monitoring.loggers[tensorboard].log_dir is a folder you can write"

    def __init__(self, log_dir: str | Path | None = None, *, flush_seconds: float = 10.0) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.flush_seconds = flush_seconds
        self._writer: SummaryWriter | None = None

    @classmethod
    def from_config(cls, cfg: Any, *, output_dir: Path) -> TensorBoardLogger:
        """From a :class:`~apt.core.config.monitoring.TensorBoardLoggerConfig`."""
        return cls(cfg.log_dir, flush_seconds=cfg.flush_seconds)

    def start(self, run: RunInfo) -> None:
        """Open a writer in the log folder, purging what follows ``start_step`` on resume.

        Raises:
            ImportError: tensorboard is not installed.
            OSError: the log folder cannot be created (a file has its name, permissions).
        """
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = self.log_dir or run.run_dir / "tensorboard"
        self._writer = SummaryWriter(
            str(self.log_dir),
            purge_step=run.start_step + 1 if run.resumed else None,
            flush_secs=self.flush_seconds,  # type: ignore[arg-type]  # any number works
        )

    def log_hparams(self, params: dict[str, Any]) -> None:
        """The config as YAML text (tag ``config``), and its scalar leaves as HParams."""
        from torch.utils.tensorboard.summary import hparams

        writer = self._started()
        text = yaml.safe_dump(params, sort_keys=False, default_flow_style=False)
        # Indented four spaces: a preformatted block in TensorBoard's markdown.
        writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()))
        scalars = {k: v for k, v in flatten_params(params).items() if isinstance(v, _SCALAR)}
        file_writer = writer._get_file_writer()
        # Written to this run's own file: SummaryWriter.add_hparams would open a new run folder.
        for summary in hparams(scalars, {}):
            file_writer.add_summary(summary)
        writer.flush()

    def log(self, metrics: dict[str, float], step: int) -> None:
        writer = self._started()
        for key, value in metrics.items():
            writer.add_scalar(key, value, global_step=step)
        writer.flush()

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def state_dict(self) -> dict[str, Any]:
        """The log folder (a resumed run with saved state purges even from step 0)."""
        return {"log_dir": str(self.log_dir)} if self.log_dir is not None else {}

    def _started(self) -> SummaryWriter:
        if self._writer is None:
            raise RuntimeError("TensorBoardLogger used before start()")
        return self._writer
