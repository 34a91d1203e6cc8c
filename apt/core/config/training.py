"""``training:`` — how the model is optimised, including ``distributed`` and ``checkpoints``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from apt.core.config.base import Section
from apt.core.config.devices import DEVICE_FORMS, is_device_form
from apt.core.config.distributed import (  # re-exported: their home before the split
    DistributedConfig,
)
from apt.core.config.plugins import TaskSpec
from apt.core.config.resume import CRITICAL

__all__ = [
    "CheckpointConfig",
    "DistributedConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "TrainingConfig",
]


class _AdamOptions(Section):
    resume = "free"

    betas: tuple[float, float] = Field(
        (0.9, 0.95), description="Adam beta1, beta2, each in [0, 1)."
    )
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    fused: bool | None = Field(None, description="Fused kernel; None: on where supported (CUDA).")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError("each beta must be in [0, 1), e.g. [0.9, 0.95]")
        return betas


class AdamWConfig(_AdamOptions):
    """AdamW (decoupled weight decay)."""

    kind: Literal["adamw"] = Field("adamw", json_schema_extra=CRITICAL)
    weight_decay: float = Field(0.1, ge=0, description="Decay of weight matrices only.")


class AdamConfig(_AdamOptions):
    """Adam (L2 penalty added to the gradient)."""

    kind: Literal["adam"] = Field("adam", json_schema_extra=CRITICAL)
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty of weight matrices only.")


class SGDConfig(Section):
    """SGD with (optional Nesterov) momentum."""

    resume = "free"

    kind: Literal["sgd"] = Field("sgd", json_schema_extra=CRITICAL)
    momentum: float = Field(0.9, ge=0, description="Momentum factor.")
    nesterov: bool = Field(False, description="Nesterov momentum.")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty of weight matrices only.")

    @model_validator(mode="after")
    def _nesterov_has_momentum(self) -> SGDConfig:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: true needs momentum > 0; set momentum (e.g. 0.9)")
        return self


OptimizerConfig = Annotated[AdamWConfig | AdamConfig | SGDConfig, Field(discriminator="kind")]


class _SchedulerBase(Section):
    resume = "free"

    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 over this many steps.")


class ConstantSchedule(_SchedulerBase):
    """Constant learning rate after warmup."""

    type: Literal["constant"] = "constant"


class LinearSchedule(_SchedulerBase):
    """Linear decay to ``min_lr_ratio * lr`` at the last step."""

    type: Literal["linear"] = "linear"
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a share of the peak.")


class CosineSchedule(_SchedulerBase):
    """Cosine decay to ``min_lr_ratio * lr`` at the last step."""

    type: Literal["cosine"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a share of the peak.")


class StepSchedule(_SchedulerBase):
    """Multiply the lr by ``gamma`` every ``step_size`` steps."""

    type: Literal["step"] = "step"
    step_size: int = Field(1000, ge=1, description="Steps between decays.")
    gamma: float = Field(0.1, gt=0, description="Decay factor.")


class ExponentialSchedule(_SchedulerBase):
    """Multiply the lr by ``gamma`` every step."""

    type: Literal["exponential"] = "exponential"
    gamma: float = Field(0.999, gt=0, description="Per-step decay factor.")


class PlateauSchedule(_SchedulerBase):
    """Multiply the lr by ``factor`` when the validation loss stops improving."""

    type: Literal["plateau"] = "plateau"
    factor: float = Field(0.5, gt=0, lt=1, description="Decay factor on a plateau.")
    patience: int = Field(2, ge=0, description="Evaluations without improvement before decaying.")
    threshold: float = Field(1e-4, ge=0, description="Relative improvement that counts.")
    min_lr: float = Field(0.0, ge=0, description="Lower bound of the lr.")


class WSDSchedule(_SchedulerBase):
    """Warmup-stable-decay: constant, then linear decay over the final ``decay_fraction``."""

    type: Literal["wsd"] = "wsd"
    decay_fraction: float = Field(0.2, gt=0, le=1, description="Share of steps spent decaying.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a share of the peak.")


SchedulerConfig = Annotated[
    ConstantSchedule
    | LinearSchedule
    | CosineSchedule
    | StepSchedule
    | ExponentialSchedule
    | PlateauSchedule
    | WSDSchedule,
    Field(discriminator="type"),
]


class CheckpointConfig(Section):
    """When and where checkpoints are written, and which are kept."""

    resume = "free"

    save_interval: int | None = Field(
        500, ge=1, description="Save every N optimizer steps (None: only at the end and on exit)."
    )
    keep_last_n: int = Field(3, ge=1, description="Newest checkpoints kept.")
    keep_best_n: int = Field(0, ge=0, description="Best checkpoints kept by best_metric.")
    best_metric: str = Field(
        "val_loss",
        description="Metric ranking checkpoints for keep_best_n (unset: eval.monitor).",
    )
    best_mode: Literal["min", "max"] = Field(
        "min", description="Lower or higher is better (unset: eval.mode)."
    )
    milestone_interval: int | None = Field(
        None, ge=1, description="Also keep every checkpoint whose step is a multiple of this."
    )
    async_save: bool = Field(False, description="Write checkpoints in a background thread.")
    directory: str | None = Field(
        None,
        description="Checkpoint folder; a relative path is relative to the working directory. "
        "None: <run folder>/checkpoints.",
    )
    on_save_error: Literal["stop", "continue"] = Field(
        "stop", description="After a failed save (disk full): stop the run, or warn and go on."
    )


class TrainingConfig(Section):
    """Optimisation: steps, batch, optimizer, LR schedule, precision, distribution, checkpoints."""

    resume = "free"

    task: TaskSpec = Field(
        default_factory=TaskSpec,
        json_schema_extra=CRITICAL,
        description="Training task and its options: a name (`python -m apt tasks`) or "
        "{kind: name, <option>: value}.",
    )
    batch_size: int = Field(
        8, ge=1, description="Sequences per micro-batch per process.", json_schema_extra=CRITICAL
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step.", json_schema_extra=CRITICAL
    )
    learning_rate: float = Field(
        3e-4, gt=0, validation_alias=AliasChoices("learning_rate", "lr"), description="Peak lr."
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to train.")
    num_epochs: int | None = Field(
        None,
        ge=1,
        description="Epochs to train (with max_steps: whichever ends first). When neither is "
        "set, the run trains one epoch.",
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm.")
    on_nonfinite: Literal["stop", "skip_step", "continue"] = Field(
        "stop",
        description="A non-finite loss, gradient norm or weight: stop (name the step, keep the "
        "last finite checkpoint as LATEST, exit 3), skip_step (skip that update; fail after "
        "max_skipped_steps in a row) or continue (train on, as before).",
    )
    max_skipped_steps: int = Field(
        10, ge=1, description="on_nonfinite: skip_step fails after this many skips in a row."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast dtype (fp16 adds a GradScaler)."
    )
    float8: Literal["off", "tensorwise", "rowwise"] = Field(
        "off",
        description="Train the linear layers' matrix products in FP8 (torchao float8 "
        "training; needs training.precision: bf16, a GPU of compute capability >= 8.9 and "
        "torchao, else the run says so and trains without FP8). tensorwise: fastest; rowwise: "
        "one scale per row, closer to bf16. Pays from about width 2048; the head stays bf16.",
    )
    compile: bool = Field(False, description="Wrap the model with torch.compile.")
    compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = Field(
        "default",
        description="torch.compile's mode when compile is on: reduce-overhead and max-autotune "
        "replay the step as CUDA graphs (fewer launch gaps, more memory); "
        "max-autotune-no-cudagraphs only searches faster kernels (longer compilation).",
    )
    compile_options: dict[str, bool | int | float | str] = Field(
        default_factory=dict,
        description="Inductor options for torch.compile on top of compile_mode's (names as "
        "torch._inductor.list_options() prints them, e.g. {combo_kernels: true}); an unknown "
        "name is refused when the model is compiled.",
    )
    device: str = Field(
        "auto",
        description="auto (cuda when present, else cpu), cpu, cuda, cuda:N (GPU N, one "
        "process) or mps (Apple GPU, one process).",
    )
    seed: int = Field(
        1234,
        ge=0,
        le=2**63 - 1,
        description="Seed of every random source (model init, data order), 0 to 2**63 - 1.",
        json_schema_extra=CRITICAL,
    )
    deterministic: bool = Field(False, description="Use deterministic algorithms only.")
    cpu_threads: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Intra-op CPU threads per process (torch.set_num_threads). None: the CPUs "
        "available shared among this machine's training processes, less one per DataLoader "
        "worker. On a machine shared with other busy work, 1 is often much faster.",
    )
    auto_resume: bool = Field(True, description="Continue from the run folder's newest checkpoint.")
    optimizer: OptimizerConfig = Field(default_factory=AdamWConfig, description="Optimizer.")
    scheduler: SchedulerConfig = Field(default_factory=ConstantSchedule, description="LR schedule.")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Parallelism."
    )
    checkpoints: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Checkpointing."
    )

    @model_validator(mode="before")
    @classmethod
    def _one_epoch_by_default(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and data.get("max_steps") is None
            and data.get("num_epochs") is None
        ):
            return {**data, "num_epochs": 1}
        return data

    @model_validator(mode="after")
    def _float8_takes_bf16(self) -> TrainingConfig:
        if self.float8 != "off" and self.precision != "bf16":
            raise ValueError(
                f"float8: {self.float8} runs under bf16 autocast, but precision is "
                f"{self.precision!r}; set precision: bf16 or float8: off"
            )
        return self

    @field_validator("device")
    @classmethod
    def _device_form(cls, device: str) -> str:
        if not is_device_form(device):
            raise ValueError(
                f"not a device APT can train on; use one of {', '.join(DEVICE_FORMS)} "
                "(N: a GPU index)"
            )
        return device
