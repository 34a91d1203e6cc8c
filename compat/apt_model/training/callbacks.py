"""Legacy ``apt_model.training.callbacks``: now :mod:`apt.trainops.engine`."""

from apt.trainops.engine import Callback, CallbackManager
from apt.trainops.engine.callbacks import EntropyBasedVotingCallback, ScheduleCallback
from apt.trainops.engine.curriculum import ScheduleExecutor
from apt_model._deprecation import warn_moved

warn_moved("apt_model.training.callbacks", "apt.trainops.engine")

TrainingCallback = Callback

__all__ = [
    "CallbackManager",
    "EntropyBasedVotingCallback",
    "ScheduleCallback",
    "ScheduleExecutor",
    "TrainingCallback",
]
