"""The training engine: Trainer, the loop, events, callbacks, tasks, optimizers, schedules.

The public names are imported on first use, so a submodule without torch (``signals``, the
plugin registries) can be imported by the CLI without loading the engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "CALLBACKS",
    "TASKS",
    "Callback",
    "CallbackManager",
    "Control",
    "EarlyStopping",
    "Event",
    "Finetuner",
    "GradientNormMonitor",
    "LRMonitor",
    "MetricsLogger",
    "PreTrainer",
    "ProgressBar",
    "RunState",
    "StepOutput",
    "TrainResult",
    "TrainState",
    "TrainedModel",
    "Trainer",
    "TrainingBundle",
    "TrainingTask",
    "load_trained_model",
]

_HOMES = {
    "CALLBACKS": "apt.trainops.plugins",
    "TASKS": "apt.trainops.plugins",
    "TrainingBundle": "apt.trainops.engine.bundle",
    "Event": "apt.trainops.engine.events",
    "Control": "apt.trainops.engine.state",
    "RunState": "apt.trainops.engine.state",
    "TrainState": "apt.trainops.engine.state",
    "TrainedModel": "apt.trainops.engine.trained_model",
    "load_trained_model": "apt.trainops.engine.trained_model",
    "StepOutput": "apt.trainops.engine.tasks",
    "TrainingTask": "apt.trainops.engine.tasks",
    "Finetuner": "apt.trainops.engine.recipes",
    "PreTrainer": "apt.trainops.engine.recipes",
    "Trainer": "apt.trainops.engine.trainer",
    "TrainResult": "apt.trainops.engine.trainer",
    **{
        name: "apt.trainops.engine.callbacks"
        for name in (
            "Callback",
            "CallbackManager",
            "EarlyStopping",
            "GradientNormMonitor",
            "LRMonitor",
            "MetricsLogger",
            "ProgressBar",
        )
    },
}

if TYPE_CHECKING:
    from apt.trainops.engine.bundle import TrainingBundle
    from apt.trainops.engine.callbacks import (
        Callback,
        CallbackManager,
        EarlyStopping,
        GradientNormMonitor,
        LRMonitor,
        MetricsLogger,
        ProgressBar,
    )
    from apt.trainops.engine.events import Event
    from apt.trainops.engine.recipes import Finetuner, PreTrainer
    from apt.trainops.engine.state import Control, RunState, TrainState
    from apt.trainops.engine.tasks import StepOutput, TrainingTask
    from apt.trainops.engine.trained_model import TrainedModel, load_trained_model
    from apt.trainops.engine.trainer import Trainer, TrainResult
    from apt.trainops.plugins import CALLBACKS, TASKS


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'apt.trainops.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
