"""A callback that signals its own process at one exact point of the training loop.

The fault suite loads it into real CLI runs (``callbacks: [{name: "faults_inject:SignalAt"}]``,
with this folder on ``PYTHONPATH``). It does nothing unless the environment arms it::

    APT_TEST_SIGNAL_AT=SIGKILL@batch_end:6      # first micro-batch of step 7 (mid-accumulation)
    APT_TEST_SIGNAL_AT=SIGTERM@step_end:18      # a graceful stop request during step 18
    APT_TEST_SIGNAL_AT=SIGKILL@checkpoint_save:44   # right after the final checkpoint commit

``<event>`` is an :class:`~apt.trainops.engine.events.Event` value and ``<step>`` the
``global_step`` the run state shows when that event fires (during the micro-batches of step
``k`` it shows ``k - 1``). The signal is sent once, the first time the point is reached. The
armed point is not part of the config, so the run that is killed and the run that resumes
execute the same command with the same config; only the environment differs, as with
``APT_FAULT_INJECT``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from apt.trainops.engine import Callback
from apt.trainops.engine.events import Event
from apt.trainops.engine.state import Control, RunState

__all__ = ["ENV_VAR", "SignalAt", "parse_spec"]

ENV_VAR = "APT_TEST_SIGNAL_AT"


def parse_spec(spec: str) -> tuple[signal.Signals, str, int]:
    """``'SIGKILL@batch_end:6'`` -> ``(Signals.SIGKILL, 'batch_end', 6)``.

    Raises:
        ValueError: the text does not have the form ``SIGNAL@event:step``.
    """
    sig_name, _, point = spec.partition("@")
    event, _, step = point.partition(":")
    if not (sig_name and event and step):
        raise ValueError(f"{ENV_VAR}={spec!r}: expected SIGNAL@event:step")
    valid = {e.value for e in Event}
    if event not in valid:
        raise ValueError(f"{ENV_VAR}={spec!r}: unknown event {event!r}; valid: {sorted(valid)}")
    return signal.Signals[sig_name], event, int(step)


class SignalAt(Callback):
    """Send the armed signal to this process at the armed (event, step); see the module doc."""

    def __init__(self) -> None:
        spec = os.environ.get(ENV_VAR, "")
        self.armed = parse_spec(spec) if spec else None
        self.fired = False

    def _reached(self, event: str, state: RunState) -> None:
        if self.armed is None or self.fired:
            return
        sig, want_event, want_step = self.armed
        if event == want_event and state.global_step == want_step:
            self.fired = True
            os.kill(os.getpid(), sig)


def _hook(event: str) -> Callable[[SignalAt, RunState, Control], None]:
    def hook(self: SignalAt, state: RunState, control: Control) -> None:
        self._reached(event, state)

    hook.__name__ = f"on_{event}"
    return hook


# The CallbackManager calls only the hooks a class overrides: override every event.
for _event in Event:
    setattr(SignalAt, _event.method_name, _hook(_event.value))
