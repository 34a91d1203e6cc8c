"""``eval:``, ``monitoring:`` and ``artifacts:`` — what the run measures, shows and keeps."""

from __future__ import annotations

from pydantic import Field

from apt.core.config.base import Section

__all__ = ["ArtifactsConfig", "EvalConfig", "MonitoringConfig"]


class EvalConfig(Section):
    """Periodic validation."""

    resume = "free"

    interval: int | None = Field(
        None, ge=1, description="Validate every N optimizer steps (None: at each epoch end)."
    )
    at_start: bool = Field(True, description="Validate before the first step (val_loss_initial).")
    batch_size: int | None = Field(None, ge=1, description="Eval batch size (None: training's).")
    max_batches: int | None = Field(
        50, ge=1, description="Batches per validation (None: the whole validation set)."
    )


class MonitoringConfig(Section):
    """Console progress and metric logs."""

    resume = "free"

    progress_bar: bool = Field(True, description="Show a progress bar with loss, lr, tokens/s.")
    log_interval: int = Field(10, ge=1, description="Log training metrics every N steps.")
    jsonl: bool = Field(True, description="Append metrics to <run>/metrics.jsonl.")


class ArtifactsConfig(Section):
    """The run folder: ``<output_dir>/<experiment_name>``."""

    resume = "free"

    output_dir: str = Field("runs", description="Root of all run folders.")
    experiment_name: str = Field(
        "default", min_length=1, description="Run folder name; the same name resumes the run."
    )
    save_final_model: bool = Field(
        True, description="Write <run>/final_model (config.json + model.safetensors) at the end."
    )
    sample_prompt: str | None = Field(
        None, description="Print a short generated sample from this prompt at the end."
    )
