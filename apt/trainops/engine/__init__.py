"""The training engine: Trainer, the loop, events, callbacks, tasks, optimizers, schedules."""

from apt.trainops.engine.bundle import TrainingBundle
from apt.trainops.engine.callbacks import (
    CALLBACKS,
    Callback,
    CallbackManager,
    EarlyStopping,
    GradientNormMonitor,
    LRMonitor,
    MetricsLogger,
    ProgressBar,
)
from apt.trainops.engine.events import Event
from apt.trainops.engine.state import Control, RunState, TrainState
from apt.trainops.engine.tasks import TASKS, StepOutput, TrainingTask
from apt.trainops.engine.trainer import Finetuner, PreTrainer, Trainer, TrainResult

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
    "Trainer",
    "TrainingBundle",
    "TrainingTask",
]
