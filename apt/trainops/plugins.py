"""The registries of the plugins a profile names: training tasks and callbacks.

They live here, apart from the classes, so that listing and checking names imports nothing
heavy: the built-in entries are import paths, imported the first time one is used
(``python -m apt tasks`` and ``config validate`` need no torch). Register your own with
``@TASKS.register("my_task")`` / ``@CALLBACKS.register("my_callback")``, or name them in YAML
by import path (``my_pkg.tasks:MyTask``).
"""

from __future__ import annotations

from typing import Any

from apt.core.registry import Registry

__all__ = ["CALLBACKS", "TASKS"]

_TASKS = "apt.trainops.engine.tasks"
_CALLBACKS = "apt.trainops.engine.callbacks"

#: Tasks by name, chosen with ``training.task`` or ``--task``.
TASKS: Registry[Any] = Registry(
    "task",
    lazy={
        "causal_lm": f"{_TASKS}.causal_lm:CausalLMTask",
        "regression": f"{_TASKS}.regression:RegressionTask",
        "sft": f"{_TASKS}.sft:SFTTask",
    },
)

#: Callbacks by name, chosen in ``callbacks:`` (``{name: early_stopping, patience: 3}``).
CALLBACKS: Registry[Any] = Registry(
    "callback",
    lazy={
        "progress_bar": f"{_CALLBACKS}.builtin:ProgressBar",
        "metrics_logger": f"{_CALLBACKS}.metrics:MetricsLogger",
        "lr_monitor": f"{_CALLBACKS}.builtin:LRMonitor",
        "gradient_norm_monitor": f"{_CALLBACKS}.builtin:GradientNormMonitor",
        "early_stopping": f"{_CALLBACKS}.builtin:EarlyStopping",
        "schedule": f"{_CALLBACKS}.curriculum:ScheduleCallback",
        "entropy_voting": f"{_CALLBACKS}.curriculum:EntropyBasedVotingCallback",
    },
)
