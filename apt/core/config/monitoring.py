"""``monitoring:`` — the progress bar and the metric loggers a run sends its numbers to.

Two spellings of the same thing::

    monitoring:
      loggers:
        - {kind: tensorboard}
        - {kind: wandb, project: p, mode: offline}
        - {kind: mlflow, tracking_uri: "sqlite:///mlruns.db", experiment: e}

    monitoring: {tensorboard: true, wandb: true, mlflow: true}   # each with its defaults

``metrics.jsonl`` in the run folder is always written (the ``jsonl`` logger needs no entry).
A logger whose package is not installed is refused here, at load time, with the ``pip install``
line of its extra: a run never finds out after an hour that it logged nowhere.
"""

from __future__ import annotations

import importlib.util
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from apt.core.config.base import Section

__all__ = [
    "EXTRAS",
    "ConsoleLoggerConfig",
    "JsonlLoggerConfig",
    "LoggerConfig",
    "MLflowLoggerConfig",
    "MonitoringConfig",
    "TensorBoardLoggerConfig",
    "WandbLoggerConfig",
]

#: Logger kind -> (the module it imports, the extra that installs it).
EXTRAS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


class ConsoleLoggerConfig(Section):
    """One log line of the training metrics every ``log_interval`` steps (rank 0)."""

    kind: Literal["console"] = "console"


class JsonlLoggerConfig(Section):
    """``<run>/metrics.jsonl``: always on; listing it changes nothing."""

    kind: Literal["jsonl"] = "jsonl"


class TensorBoardLoggerConfig(Section):
    """TensorBoard event files (``pip install "apt-transformer[tensorboard]"``)."""

    kind: Literal["tensorboard"] = "tensorboard"
    log_dir: str | None = Field(
        None,
        description="Where the event files go (None: <run>/tensorboard; `tensorboard --logdir "
        "<output_dir>` shows every run).",
    )
    flush_seconds: float = Field(
        10.0, gt=0, description="Write buffered points to disk at least this often."
    )


class WandbLoggerConfig(Section):
    """A Weights & Biases run (``pip install "apt-transformer[wandb]"``); its id is kept in
    the run folder, so a resumed run continues the same W&B run."""

    kind: Literal["wandb"] = "wandb"
    project: str = Field("apt", min_length=1, description="W&B project.")
    entity: str | None = Field(None, description="W&B team or user (None: your default).")
    name: str | None = Field(None, description="Run name (None: artifacts.experiment_name).")
    group: str | None = Field(None, description="Run group.")
    tags: list[str] = Field(default_factory=list, description="Run tags.")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="online, offline or disabled (None: $WANDB_MODE, else online)."
    )
    dir: str | None = Field(None, description="Where wandb writes its files (None: <run>).")


class MLflowLoggerConfig(Section):
    """An MLflow run (``pip install "apt-transformer[mlflow]"``); its id is kept in the run
    folder, so a resumed run continues the same MLflow run."""

    kind: Literal["mlflow"] = "mlflow"
    tracking_uri: str | None = Field(
        None,
        description="Tracking server or store: http(s)://host or sqlite:///file.db "
        "(None: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db, shared by the runs "
        "there so the MLflow UI compares them).",
    )
    experiment: str = Field("apt", min_length=1, description="MLflow experiment name.")
    run_name: str | None = Field(None, description="Run name (None: artifacts.experiment_name).")
    tags: dict[str, str] = Field(default_factory=dict, description="Run tags.")


LoggerConfig = Annotated[
    ConsoleLoggerConfig
    | JsonlLoggerConfig
    | TensorBoardLoggerConfig
    | WandbLoggerConfig
    | MLflowLoggerConfig,
    Field(discriminator="kind"),
]

_SWITCHES = ("console", "jsonl", "tensorboard", "wandb", "mlflow")


class MonitoringConfig(Section):
    """The progress bar and the metric loggers."""

    resume = "free"

    progress_bar: bool = Field(True, description="Show a progress bar with loss, lr, tokens/s.")
    log_interval: int = Field(10, ge=1, description="Log training metrics every N steps.")
    loggers: list[LoggerConfig] = Field(
        default_factory=list,
        description="Where metrics go besides metrics.jsonl: entries of kind console, jsonl, "
        "tensorboard, wandb, mlflow (each at most once).",
    )
    peak_flops: float | None = Field(
        None,
        gt=0,
        description="Peak FLOP/s of one device for the MFU estimate (None: looked up by device "
        "name; no MFU when unknown).",
    )

    @model_validator(mode="before")
    @classmethod
    def _switches_become_loggers(cls, data: Any) -> Any:
        """Seed 002's form ``{tensorboard: true, wandb: true}``: each true switch appends a
        logger of that kind with its defaults (unless ``loggers`` lists that kind already)."""
        if not isinstance(data, dict) or not any(k in data for k in _SWITCHES):
            return data
        data = dict(data)
        loggers = list(data.get("loggers") or [])
        listed = {entry.get("kind") for entry in loggers if isinstance(entry, dict)}
        for kind in _SWITCHES:
            if kind not in data:
                continue
            switch = data.pop(kind)
            if not isinstance(switch, bool):
                raise ValueError(
                    f"{kind}: must be true or false (to set options, use loggers: "
                    f"[{{kind: {kind}, ...}}])"
                )
            if kind == "jsonl" and not switch:
                raise ValueError("jsonl: metrics.jsonl is always written; remove jsonl: false")
            if switch and kind not in listed:
                loggers.append({"kind": kind})
        data["loggers"] = loggers
        return data

    @field_validator("loggers")
    @classmethod
    def _each_kind_once_and_installed(cls, loggers: list[Any]) -> list[Any]:
        kinds = [entry.kind for entry in loggers]
        twice = sorted({k for k in kinds if kinds.count(k) > 1})
        if twice:
            raise ValueError(f"lists {', '.join(twice)} more than once; keep one entry each")
        for kind in kinds:
            if kind in EXTRAS:
                module, extra = EXTRAS[kind]
                if importlib.util.find_spec(module) is None:
                    raise ValueError(
                        f"the {kind} logger needs the {module!r} package, which is not "
                        f'installed: pip install "apt-transformer[{extra}]" (or remove '
                        f"the {kind} logger)"
                    )
        return loggers

    def logger(self, kind: str) -> Any:
        """The configured logger of ``kind``, or None."""
        return next((entry for entry in self.loggers if entry.kind == kind), None)
