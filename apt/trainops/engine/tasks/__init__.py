"""Training tasks: a registry of recipes that say what is trained and how a batch is scored."""

from apt.trainops.engine.tasks.base import TASKS, NoOptions, StepOutput, TrainingTask, build_task
from apt.trainops.engine.tasks.causal_lm import CausalLMTask, split_batch
from apt.trainops.engine.tasks.regression import RegressionTask
from apt.trainops.engine.tasks.sft import SFTTask

__all__ = [
    "TASKS",
    "CausalLMTask",
    "NoOptions",
    "RegressionTask",
    "SFTTask",
    "StepOutput",
    "TrainingTask",
    "build_task",
    "split_batch",
]
