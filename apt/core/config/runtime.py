"""``eval:`` and ``artifacts:`` — what the run measures and keeps (``monitoring:`` is in
:mod:`apt.core.config.monitoring`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from apt.core.config.base import Section

__all__ = ["ArtifactsConfig", "EvalConfig"]


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
    monitor: str = Field(
        "val_loss",
        pattern=r"^[A-Za-z0-9_./-]+$",
        description="The metric that says which evaluation is best (val_loss, val_accuracy, "
        "val_bpb, ...): tracked as best_<monitor>, ranks checkpoints for keep_best_n, and is "
        "what early_stopping watches unless told otherwise.",
    )
    mode: Literal["min", "max"] = Field(
        "min", description="min: lower is better (losses); max: higher is better (accuracy)."
    )


class ArtifactsConfig(Section):
    """The run folder: ``<output_dir>/<experiment_name>``."""

    resume = "free"

    output_dir: str = Field("runs", description="Root of all run folders.")
    experiment_name: str = Field(
        "default",
        description="Run folder name, one path component (no / or \\, not . or ..); the same "
        "name resumes the run.",
    )
    save_final_model: bool = Field(
        True, description="Write <run>/final_model (config.json + model.safetensors) at the end."
    )
    sample_prompt: str | None = Field(
        None, description="Print a short generated sample from this prompt at the end."
    )

    @field_validator("experiment_name")
    @classmethod
    def _one_path_component(cls, name: str) -> str:
        problem = _component_problem(name)
        if problem:
            raise ValueError(f"{problem}; the run folder is <output_dir>/<experiment_name>")
        return name


def _component_problem(name: str) -> str | None:
    """Why ``name`` cannot be one folder or file name, or None when it can.

    One component: not empty, not ``.`` or ``..``, no ``/`` or ``\\`` (so never absolute, never
    outside its parent folder), no control character (a NUL ends a path in the OS).
    """
    if name in ("", ".", ".."):
        return f"must be a folder name, not {name!r}"
    if "/" in name or "\\" in name:
        return "must be one folder name, without / or \\"
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        return "must not hold control characters (NUL, newline, tab, ...)"
    return None
