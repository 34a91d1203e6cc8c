"""Callbacks: the base class, the dispatcher, built-ins and the YAML registry."""

from apt.trainops.engine.callbacks.base import Callback, CallbackManager
from apt.trainops.engine.callbacks.builtin import (
    EarlyStopping,
    GradientNormMonitor,
    LRMonitor,
    ProgressBar,
)
from apt.trainops.engine.callbacks.curriculum import EntropyBasedVotingCallback, ScheduleCallback
from apt.trainops.engine.callbacks.metrics import MetricsLogger
from apt.trainops.engine.callbacks.registry import CALLBACKS, build_callback, build_callbacks

__all__ = [
    "CALLBACKS",
    "Callback",
    "CallbackManager",
    "EarlyStopping",
    "EntropyBasedVotingCallback",
    "GradientNormMonitor",
    "LRMonitor",
    "MetricsLogger",
    "ProgressBar",
    "ScheduleCallback",
    "build_callback",
    "build_callbacks",
]
