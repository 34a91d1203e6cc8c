"""``Callback`` (one ``on_<event>`` method per :class:`Event`) and ``CallbackManager``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from apt.trainops.engine.events import REVERSED_EVENTS, Event
from apt.trainops.engine.state import Control, RunState

__all__ = ["Callback", "CallbackManager"]


class Callback:
    """Base class of every callback: override the events you need.

    Every hook receives the same two arguments: a read-only :class:`RunState` and the
    :class:`Control` through which it may request stop, save or eval. A stateful callback
    overrides :meth:`state_dict` / :meth:`load_state_dict`; its state is saved in checkpoints
    under :attr:`state_key`.
    """

    #: Key of this callback's state inside a checkpoint (default: the class name).
    @property
    def state_key(self) -> str:
        return type(self).__name__

    def state_dict(self) -> dict[str, Any]:
        """JSON-compatible state to checkpoint (empty for stateless callbacks)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def on_train_start(self, state: RunState, control: Control) -> None:
        """Before the first step (after a resume restored the state)."""

    def on_train_end(self, state: RunState, control: Control) -> None:
        """After the last step, final eval and final save."""

    def on_epoch_start(self, state: RunState, control: Control) -> None:
        """Before the first micro-batch of an epoch."""

    def on_epoch_end(self, state: RunState, control: Control) -> None:
        """After the last step of an epoch."""

    def on_step_start(self, state: RunState, control: Control) -> None:
        """Before the first micro-batch of an optimizer step."""

    def on_step_end(self, state: RunState, control: Control) -> None:
        """After the optimizer step and the LR scheduler step."""

    def on_batch_start(self, state: RunState, control: Control) -> None:
        """Before the forward pass of one micro-batch."""

    def on_batch_end(self, state: RunState, control: Control) -> None:
        """After the backward pass of one micro-batch."""

    def on_before_backward(self, state: RunState, control: Control) -> None:
        """After the forward pass, before ``loss.backward()``."""

    def on_after_backward(self, state: RunState, control: Control) -> None:
        """After ``loss.backward()`` (gradients may be unsynchronised during accumulation)."""

    def on_before_optimizer_step(self, state: RunState, control: Control) -> None:
        """Gradients are final (synchronised, unscaled, clipped)."""

    def on_after_optimizer_step(self, state: RunState, control: Control) -> None:
        """Parameters were updated; gradients are zeroed next."""

    def on_eval_start(self, state: RunState, control: Control) -> None:
        """Before validation."""

    def on_eval_end(self, state: RunState, control: Control) -> None:
        """After validation; ``state.metrics`` holds the new values."""

    def on_checkpoint_save(self, state: RunState, control: Control) -> None:
        """After a checkpoint was committed."""

    def on_checkpoint_load(self, state: RunState, control: Control) -> None:
        """After the run resumed from a checkpoint."""

    def on_exception(self, state: RunState, control: Control) -> None:
        """The loop is being left by an exception (re-raised after the callbacks ran)."""


class CallbackManager:
    """Dispatches events: registration order, reversed for ``*_end`` and ``after_*`` events."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks: list[Callback] = list(callbacks)
        self._plans: dict[Event, list[Any]] = {}
        self._rebuild()

    def add(self, callback: Callback) -> None:
        """Register one more callback (runs after the ones already registered)."""
        self.callbacks.append(callback)
        self._rebuild()

    def _rebuild(self) -> None:
        # Only callbacks that override a hook are called for it: an event costs nothing when no
        # callback listens, which keeps the per-micro-batch events off the hot path.
        for event in Event:
            order = reversed(self.callbacks) if event in REVERSED_EVENTS else self.callbacks
            self._plans[event] = [
                getattr(cb, event.method_name)
                for cb in order
                if getattr(type(cb), event.method_name) is not getattr(Callback, event.method_name)
            ]

    def fire(self, event: Event, state: RunState, control: Control) -> None:
        """Call every listening callback's ``on_<event>``."""
        for hook in self._plans[event]:
            hook(state, control)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """The state of every stateful callback, by its ``state_key``."""
        out: dict[str, dict[str, Any]] = {}
        for cb in self.callbacks:
            state = cb.state_dict()
            if state:
                if cb.state_key in out:
                    raise ValueError(
                        f"two stateful callbacks share the state key {cb.state_key!r}; "
                        "override state_key in one of them"
                    )
                out[cb.state_key] = state
        return out

    def load_state_dict(self, states: dict[str, dict[str, Any]]) -> None:
        """Hand each callback its saved state (callbacks absent from ``states`` keep theirs)."""
        for cb in self.callbacks:
            if cb.state_key in states:
                cb.load_state_dict(states[cb.state_key])
