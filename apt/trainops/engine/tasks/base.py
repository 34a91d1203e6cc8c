"""``TrainingTask``: what is trained and how one batch becomes a loss.

The engine drives a task and never looks inside batches or models; adding a task needs no
change to the engine (register it with :data:`TASKS`, or name it ``package.module:Class``, and
pick it with ``training.task``). A task with parameters declares them as its ``Options`` model;
``training.task: {kind: my_task, beta: 0.1}`` validates them when the task is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import Dataset

from apt.core.config import (
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    TaskSpec,
    validate_options,
)
from apt.core.config.base import Section
from apt.core.errors import ConfigError
from apt.trainops.engine.lr_schedules import build_lr_scheduler
from apt.trainops.engine.optim import build_optimizer
from apt.trainops.plugins import TASKS

__all__ = ["TASKS", "NoOptions", "StepOutput", "TrainingTask", "build_task"]


@dataclass
class StepOutput:
    """The result of one micro-batch.

    Attributes:
        loss: mean loss over the batch's targets, with autograd history when training.
        stats: detached scalars worth logging (an APT model's auxiliary losses, its MoE
            overflow fraction, ...); the loop logs each as ``train_<name>``, the step's mean
            over its targets like ``train_loss``.
        totals: sums over the batch's targets (correct predictions, entropy, ...); evaluation
            adds them over batches and ranks and reports ``val_<name>`` = sum / targets.
    """

    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    totals: dict[str, torch.Tensor] = field(default_factory=dict)


class NoOptions(Section):
    """A task without options."""


class TrainingTask:
    """Base class of tasks. Subclasses implement ``build_model``, ``build_datasets``,
    ``count_targets`` and ``train_step``; the rest has sensible defaults.

    Args:
        options: the task's validated options (an instance of its ``Options``; default: the
            options' defaults).

    Loss normalisation contract: ``train_step`` returns the MEAN loss over the batch's
    targets and ``count_targets`` says how many targets the batch holds; the engine weights
    each micro-batch by its share of the step's targets (over all ranks), so k micro-batches of
    b samples give exactly the gradient of one batch of k*b.
    """

    name: ClassVar[str] = ""
    #: The loss is a likelihood (a cross-entropy in nats), so exp(loss) is a perplexity worth
    #: reporting as ``val_perplexity``. Off unless a task says so: for a regression loss it
    #: would be a meaningless number.
    loss_is_cross_entropy: ClassVar[bool] = False
    #: The task's options (``training.task: {kind: ..., <option>: ...}``), a config section.
    Options: ClassVar[type[Section]] = NoOptions

    def __init__(self, options: Section | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        """The model to train when the user did not pass one."""
        raise NotImplementedError

    def build_datasets(
        self, cfg: DataConfig, *, seed: int
    ) -> tuple[Dataset[Any], Dataset[Any] | None]:
        """(train, validation) datasets when the user did not pass data."""
        raise NotImplementedError

    def build_optimizer(
        self, cfg: OptimizerConfig, *, model: nn.Module, learning_rate: float
    ) -> Optimizer:
        """The optimizer (default: the factory in :mod:`apt.trainops.engine.optim`)."""
        return build_optimizer(cfg, model=model, learning_rate=learning_rate)

    def build_scheduler(
        self, cfg: SchedulerConfig, *, optimizer: Optimizer, total_steps: int
    ) -> Any:
        """The LR scheduler (default: :func:`build_lr_scheduler`)."""
        return build_lr_scheduler(cfg, optimizer=optimizer, total_steps=total_steps)

    def build_criterion(self) -> Callable[..., torch.Tensor]:
        """The loss function used by ``train_step`` / ``validation_step``."""
        raise NotImplementedError

    #: ``without_targets`` is implemented: validation sets can be padded for even rank shards.
    can_pad: ClassVar[bool] = False

    def without_targets(self, sample: Any) -> Any:
        """A copy of one dataset sample that contributes no loss term (padding)."""
        raise NotImplementedError

    def collate(self, data: DataConfig | None = None) -> Callable[[list[Any]], Any] | None:
        """The function that joins samples into a batch for the train and eval loaders the
        engine builds from ``data`` (None, the default: ``torch.utils.data.default_collate``).
        A task whose samples differ in length pads them here; it must also accept
        ``without_targets`` samples (validation padding for even rank shards)."""
        return None

    def count_targets(self, batch: Any) -> int:
        """Number of loss terms in ``batch`` (called on the CPU batch, no device sync)."""
        raise NotImplementedError

    def train_step(
        self, model: nn.Module, batch: Any, criterion: Callable[..., torch.Tensor]
    ) -> StepOutput:
        """Forward one micro-batch (already on the device) and return its mean loss."""
        raise NotImplementedError

    def validation_step(
        self, model: nn.Module, batch: Any, criterion: Callable[..., torch.Tensor]
    ) -> StepOutput:
        """Like ``train_step`` without gradients (default: the same computation)."""
        return self.train_step(model, batch, criterion)

    def token_targets(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)``, (B, T) each, -100 marking ignored labels: the batch as a
        strategy that runs the model in pieces and computes the next-token cross-entropy
        itself needs it (``strategy: pipeline``).

        Raises:
            ConfigError: the task is no next-token language-modelling task (the default).
        """
        raise ConfigError(
            f"training.task {self.name or type(self).__name__!r} cannot run under "
            "training.distributed.strategy pipeline, which computes a next-token "
            "cross-entropy itself; use task causal_lm or sft, or another strategy"
        )


def build_task(spec: TaskSpec) -> TrainingTask:
    """The task ``spec.kind`` names (registered, or ``package.module:Class``), with its options.

    Raises:
        ConfigError: unknown name (valid names listed), an import path that is not a
            TrainingTask, or an option the task does not have (with the nearest name).
    """
    cls = TASKS.lookup(spec.kind)
    if not (isinstance(cls, type) and issubclass(cls, TrainingTask)):
        found = type(cls).__name__ if cls is not None else "nothing"
        raise ConfigError(
            f"training.task: {spec.kind!r} must name a subclass of "
            f"apt.trainops.engine.TrainingTask (found {found})"
        )
    return cls(validate_options(cls.Options, spec.options, where="training.task"))
