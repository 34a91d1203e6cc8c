"""Legacy ``apt_model.training.callbacks`` (APT 1.x): now :mod:`apt.trainops.engine`.

The 1.x names keep their 1.x signatures and behaviour (``ScheduleExecutor(config, modules,
total_epochs, total_steps)``, ``CallbackManager(callbacks).trigger(event, **kwargs)``, ...);
``TrainingCallback`` is also an :class:`apt.trainops.engine.Callback`, so a 1.x callback runs in
the 2.0 ``Trainer(callbacks=[...])``. docs/migration.md maps each name to its replacement.
"""

from apt_model._deprecation import warn_moved
from apt_model.training._callback_adapter import (
    CallbackManager,
    EntropyBasedVotingCallback,
    ScheduleCallback,
    TrainingCallback,
)
from apt_model.training._schedule_executor import (
    ScheduleExecutor,
    cosine_anneal,
    get_interpolator,
    lerp,
)

warn_moved("apt_model.training.callbacks", "apt.trainops.engine")

__all__ = [
    "CallbackManager",
    "EntropyBasedVotingCallback",
    "ScheduleCallback",
    "ScheduleExecutor",
    "TrainingCallback",
    "cosine_anneal",
    "get_interpolator",
    "lerp",
]
