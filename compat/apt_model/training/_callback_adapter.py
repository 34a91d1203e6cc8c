"""The APT 1.x callback interface, also a 2.0 :class:`~apt.trainops.engine.Callback`.

A 1.x ``TrainingCallback`` subclass works in both worlds: a 1.x loop calls its hooks through
:class:`CallbackManager` ``.trigger(event, **kwargs)``, and passed to the 2.0
``Trainer(callbacks=[...])`` it receives the same hooks from the engine's events:

==================================  =================  =========================================
1.x hook (keyword arguments)        2.0 event          values
==================================  =================  =========================================
``on_train_begin()``                ``train_start``
``on_epoch_begin(epoch)``           ``epoch_start``    ``state.epoch`` (from 0)
``on_batch_begin(batch_idx)``       ``batch_start``    ``state.batch_in_epoch``: the micro-batch
                                                       index in the epoch, from 0
``on_batch_end(batch_idx, loss)``   ``batch_end``      ``state.batch_in_epoch - 1``, and
                                                       ``loss`` = ``state.batch_loss``: that
                                                       micro-batch's mean loss
``on_step(step)``                   ``step_end``       ``state.global_step`` (from 1), after the
                                                       step's ``on_batch_end`` calls
``on_epoch_end(epoch, metrics)``    ``epoch_end``      ``state.epoch``, ``state.metrics``
``on_train_end()``                  ``train_end``
==================================  =================  =========================================

With gradient accumulation each micro-batch gets its own ``on_batch_end`` with its own loss, as
in 1.x, and ``on_step`` follows the step's last one. Under data parallelism the loss is the rank's
own micro-batch loss (1.x ran in one process); ``state.last_loss`` is the step's mean over ranks.

Three 1.x hooks share their name with a 2.0 event method (``on_train_end``, ``on_epoch_end``,
``on_batch_end``) but not its arguments; a subclass's override of one of them is wrapped so that
a call from the engine (``(state, control)``) is translated and any other call goes through as is.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from apt.trainops.engine.callbacks.base import Callback
from apt.trainops.engine.state import Control, RunState

__all__ = ["CallbackManager", "EntropyBasedVotingCallback", "ScheduleCallback", "TrainingCallback"]

#: The engine's arguments turned into the 1.x keyword arguments of the hooks whose names clash.
_SHARED_NAMES: dict[str, Callable[[RunState], dict[str, Any]]] = {
    "on_train_end": lambda state: {},
    "on_epoch_end": lambda state: {"epoch": state.epoch, "metrics": state.metrics},
    "on_batch_end": lambda state: {"batch_idx": state.batch_in_epoch - 1, "loss": state.batch_loss},
}


def _from_engine(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return (
        len(args) == 2
        and not kwargs
        and isinstance(args[0], RunState)
        and isinstance(args[1], Control)
    )


def _two_way(name: str, legacy: Callable[..., Any]) -> Callable[..., Any]:
    """``legacy`` (a 1.x hook) that also answers the engine's call of the same name."""
    translate = _SHARED_NAMES[name]

    @functools.wraps(legacy)
    def hook(self: TrainingCallback, *args: Any, **kwargs: Any) -> Any:
        if _from_engine(args, kwargs):
            return legacy(self, **translate(args[0]))
        return legacy(self, *args, **kwargs)

    hook.__apt_two_way__ = True  # type: ignore[attr-defined]
    return hook


class TrainingCallback(Callback):
    """Base class of 1.x callbacks: override the hooks you need (see the module docstring for
    when the 2.0 engine calls each one)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _SHARED_NAMES:
            method = cls.__dict__.get(name)
            if inspect.isfunction(method) and not getattr(method, "__apt_two_way__", False):
                setattr(cls, name, _two_way(name, method))

    # ------------------------------------------------------------------ the 1.x hooks
    def on_train_begin(self, **kwargs: Any) -> None:
        """At the beginning of training."""

    def on_train_end(self, **kwargs: Any) -> None:  # type: ignore[override]
        """At the end of training."""

    def on_epoch_begin(self, epoch: int, **kwargs: Any) -> None:
        """At the beginning of each epoch (from 0)."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any], **kwargs: Any) -> None:  # type: ignore[override]
        """At the end of each epoch."""

    def on_batch_begin(self, batch_idx: int, **kwargs: Any) -> None:
        """At the beginning of each (micro-)batch; ``batch_idx`` counts from 0 in the epoch."""

    def on_batch_end(self, batch_idx: int, loss: float, **kwargs: Any) -> None:  # type: ignore[override]
        """At the end of each (micro-)batch."""

    def on_step(self, step: int, **kwargs: Any) -> None:
        """After each optimizer step; ``step`` counts from 1."""

    # ------------------------------------------------------------------ 2.0 events -> 1.x hooks
    def on_train_start(self, state: RunState, control: Control) -> None:
        self.on_train_begin()

    def on_epoch_start(self, state: RunState, control: Control) -> None:
        self.on_epoch_begin(epoch=state.epoch)

    def on_batch_start(self, state: RunState, control: Control) -> None:
        self.on_batch_begin(batch_idx=state.batch_in_epoch)

    def on_step_end(self, state: RunState, control: Control) -> None:
        self.on_step(step=state.global_step)


for _name in _SHARED_NAMES:
    setattr(TrainingCallback, _name, _two_way(_name, TrainingCallback.__dict__[_name]))


class ScheduleCallback(TrainingCallback):
    """Runs a 1.x :class:`ScheduleExecutor`: ``on_epoch_start(epoch)`` at each epoch's start,
    ``on_step(step)`` after each optimizer step."""

    def __init__(self, schedule_executor: Any) -> None:
        self.executor = schedule_executor

    def on_epoch_begin(self, epoch: int, **kwargs: Any) -> None:
        self.executor.on_epoch_start(epoch)

    def on_step(self, step: int, **kwargs: Any) -> None:
        self.executor.on_step(step)


class EntropyBasedVotingCallback(TrainingCallback):
    """Switches ``modules["voter"]`` on while a batch's ``entropy`` keyword exceeds
    ``threshold`` and off otherwise; batches reported without ``entropy`` change nothing (the
    2.0 engine reports none: its own ``EntropyBasedVotingCallback`` reads ``val_entropy``)."""

    def __init__(self, modules: dict[str, Any], threshold: float = 2.2) -> None:
        self.modules = modules
        self.threshold = threshold

    def on_batch_end(  # type: ignore[override]
        self, batch_idx: int, loss: float, entropy: float | None = None, **kwargs: Any
    ) -> None:
        if entropy is not None and "voter" in self.modules:
            self.modules["voter"].enable(entropy > self.threshold)


class CallbackManager:
    """Calls one 1.x hook on every callback, in order: ``trigger("on_step", step=3)``.

    Args:
        callbacks: the callbacks (kept as given: ``manager.callbacks`` is this list). A callback
            without the hook is skipped.
    """

    def __init__(self, callbacks: list[Any]) -> None:
        self.callbacks = callbacks

    def trigger(self, event: str, **kwargs: Any) -> None:
        """Call ``callback.<event>(**kwargs)`` on each callback that has it."""
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method:
                method(**kwargs)
