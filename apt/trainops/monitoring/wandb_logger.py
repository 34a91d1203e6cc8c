"""``kind: wandb``: a Weights & Biases run, continued by a resumed process.

The run id is kept in ``<run>/monitoring.json``; a resumed process opens the same W&B run
(``resume="allow"``) and the Monitor skips the steps it already sent, since W&B drops a step
lower than one it has. Offline runs (``mode: offline``) are folders
``<dir>/wandb/offline-run-*-<id>``, one per process; ``wandb sync`` uploads them as one run.

Nothing of the machine is sent besides the metrics and the (redacted) config: no console
capture, no code, no git state, no command line or environment metadata, no system metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from apt.core.config.monitoring import WandbLoggerConfig
from apt.trainops.monitoring.base import MetricLogger, RunInfo

if TYPE_CHECKING:
    from wandb.sdk.wandb_run import Run

__all__ = ["QUIET_SETTINGS", "WandbLogger"]

#: ``wandb.Settings`` that keep the machine's secrets and noise out of the run. A name the
#: installed wandb does not know is left out (older releases lack some).
QUIET_SETTINGS: dict[str, Any] = {
    "console": "off",  # no capture of stdout/stderr
    "save_code": False,
    "disable_code": True,
    "disable_git": True,
    "disable_job_creation": True,
    "x_disable_meta": True,  # command line, environment, host metadata
    "x_disable_machine_info": True,
    "x_disable_stats": True,  # no system-metrics sampling thread
    "x_save_requirements": False,
    # wandb buffers its local transaction log for 15 s by default and a kill loses the
    # buffer; flushed every 0.1 s, a kill loses little more than the last step's open row.
    "x_transaction_log_flush_interval": 0.1,
    # A run of its own beside any run the application opened; this one is never finished
    # by a later wandb.init.
    "reinit": "create_new",
    "quiet": True,
}


def _settings(wandb: Any) -> Any:
    """``wandb.Settings`` of :data:`QUIET_SETTINGS`, with the names this wandb knows."""
    known = getattr(wandb.Settings, "model_fields", None)
    chosen = {k: v for k, v in QUIET_SETTINGS.items() if known is None or k in known}
    return wandb.Settings(**chosen)


class WandbLogger(MetricLogger):
    """Logs to a W&B run (online, offline or disabled).

    Args:
        cfg: the :class:`~apt.core.config.monitoring.WandbLoggerConfig` entry.
    """

    kind = "wandb"
    fix = (
        "check monitoring.loggers[wandb] (project, entity, mode) and your W&B login "
        "(`wandb login` or WANDB_API_KEY; mode: offline needs neither)"
    )

    def __init__(self, cfg: WandbLoggerConfig) -> None:
        self.cfg = cfg
        self._run: Run | None = None
        self.run_id: str | None = None

    @classmethod
    def from_config(cls, cfg: Any, *, output_dir: Path) -> WandbLogger:
        """From a :class:`~apt.core.config.monitoring.WandbLoggerConfig`."""
        return cls(cfg)

    def start(self, run: RunInfo) -> None:
        """Open the saved W&B run, or a new one.

        Raises:
            ImportError: wandb is not installed.
            Exception: whatever ``wandb.init`` raises (not logged in, server unreachable).
        """
        import wandb

        folder = Path(self.cfg.dir) if self.cfg.dir is not None else run.run_dir
        folder.mkdir(parents=True, exist_ok=True)  # wandb falls back to /tmp without it
        self._run = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            name=self.cfg.name or run.name,
            group=self.cfg.group,
            tags=list(self.cfg.tags) or None,
            mode=self.cfg.mode,  # None: $WANDB_MODE, else online (wandb's own rule)
            dir=str(folder),
            id=run.saved.get("run_id"),  # None: wandb picks a new id
            resume="allow",
            settings=_settings(wandb),
        )
        self.run_id = self._run.id

    def log_hparams(self, params: dict[str, Any]) -> None:
        """The config of the new W&B run."""
        self._started().config.update(params, allow_val_change=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._started().log(metrics, step=step)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None

    def state_dict(self) -> dict[str, Any]:
        """``{"run_id": ...}``: the W&B run a resumed process continues."""
        return {"run_id": self.run_id} if self.run_id else {}

    def _started(self) -> Run:
        if self._run is None:
            raise RuntimeError("WandbLogger used before start()")
        return self._run
