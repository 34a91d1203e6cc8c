"""Learning-rate schedules with linear warmup, as closed-form multipliers of the peak lr.

Every schedule is a builder in :data:`LR_SCHEDULES` under its ``training.scheduler.type``. The
closed-form ones register a shape with :func:`closed_form`: ``multiplier(step)`` of the number
of optimizer steps already taken, applied by ``torch.optim.lr_scheduler.LambdaLR``, so the state
to checkpoint is one counter. ``plateau`` reacts to validation loss and is a small stateful
scheduler of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from apt.core.config import SchedulerConfig
from apt.core.config.training import (
    ConstantSchedule,
    CosineSchedule,
    ExponentialSchedule,
    LinearSchedule,
    PlateauSchedule,
    StepSchedule,
    WSDSchedule,
)
from apt.core.registry import Registry

__all__ = ["LR_SCHEDULES", "PlateauScheduler", "build_lr_scheduler", "closed_form", "lr_multiplier"]


#: LR scheduler builders by ``training.scheduler.type``: ``build(cfg, optimizer, total_steps)``.
LR_SCHEDULES: Registry[Callable[[Any, Optimizer, int], Any]] = Registry("LR schedule")

Shape = Callable[[Any, float, int], float]


def closed_form(name: str) -> Callable[[Shape], Shape]:
    """Register ``shape(cfg, progress, steps_after_warmup) -> multiplier`` as schedule ``name``:
    linear warmup, then the shape over the steps left (``progress`` from 0 to 1)."""

    def register(shape: Shape) -> Shape:
        def build(cfg: Any, optimizer: Optimizer, total_steps: int) -> LambdaLR:
            return LambdaLR(optimizer, lr_multiplier(cfg, total_steps, shape))

        LR_SCHEDULES.register(name)(build)
        return shape

    return register


def lr_multiplier(cfg: SchedulerConfig, total_steps: int, shape: Shape) -> Callable[[int], float]:
    """The multiplier of the peak lr at each step (0-based): warmup, then ``shape``."""
    warmup = cfg.warmup_steps
    span = max(total_steps - warmup, 1)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        after = step - warmup
        return shape(cfg, min(after / span, 1.0), after)

    return multiplier


@closed_form("constant")
def _constant(cfg: ConstantSchedule, progress: float, after: int) -> float:
    return 1.0


@closed_form("linear")
def _linear(cfg: LinearSchedule, progress: float, after: int) -> float:
    return 1.0 - (1.0 - cfg.min_lr_ratio) * progress


@closed_form("cosine")
def _cosine(cfg: CosineSchedule, progress: float, after: int) -> float:
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@closed_form("step")
def _step(cfg: StepSchedule, progress: float, after: int) -> float:
    return float(cfg.gamma ** (after // cfg.step_size))


@closed_form("exponential")
def _exponential(cfg: ExponentialSchedule, progress: float, after: int) -> float:
    return float(cfg.gamma**after)


@closed_form("wsd")
def _wsd(cfg: WSDSchedule, progress: float, after: int) -> float:
    decay_start = 1.0 - cfg.decay_fraction
    if progress <= decay_start:
        return 1.0
    return 1.0 - (1.0 - cfg.min_lr_ratio) * (progress - decay_start) / cfg.decay_fraction


class PlateauScheduler:
    """Warmup, then multiply the lr by ``factor`` after ``patience`` evaluations without a
    relative improvement of ``threshold`` in the monitored loss.

    ``step()`` is called every optimizer step (warmup); ``report(value)`` after each evaluation.
    """

    def __init__(self, cfg: PlateauSchedule, optimizer: Optimizer) -> None:
        self.cfg = cfg
        self.optimizer = optimizer
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.scale = 1.0
        self.best = math.inf
        self.bad_evals = 0
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        warm = (
            min((self.last_step + 1) / self.cfg.warmup_steps, 1.0) if self.cfg.warmup_steps else 1.0
        )
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = max(base * self.scale * warm, self.cfg.min_lr)

    def step(self) -> None:
        """Advance one optimizer step."""
        self.last_step += 1
        self._apply()

    def report(self, value: float) -> None:
        """Feed a validation loss (lower is better)."""
        if value < self.best * (1 - self.cfg.threshold):
            self.best, self.bad_evals = value, 0
            return
        self.bad_evals += 1
        if self.bad_evals > self.cfg.patience:
            self.scale *= self.cfg.factor
            self.bad_evals = 0
            self._apply()

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "best": self.best,
            "bad_evals": self.bad_evals,
            "last_step": self.last_step,
            "base_lrs": self.base_lrs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.best = state["scale"], state["best"]
        self.bad_evals, self.last_step = state["bad_evals"], state["last_step"]
        self.base_lrs = list(state["base_lrs"])
        self._apply()


def build_lr_scheduler(
    cfg: SchedulerConfig, *, optimizer: Optimizer, total_steps: int
) -> LambdaLR | PlateauScheduler:
    """The scheduler for ``training.scheduler``; call ``.step()`` once per optimizer step.

    Raises:
        ConfigError: no schedule is registered under ``cfg.type``.
    """
    return LR_SCHEDULES.get(cfg.type)(cfg, optimizer, total_steps)


@LR_SCHEDULES.register("plateau")
def _plateau(cfg: PlateauSchedule, optimizer: Optimizer, total_steps: int) -> PlateauScheduler:
    return PlateauScheduler(cfg, optimizer)  # reacts to evaluations: a scheduler of its own
