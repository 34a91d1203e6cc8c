"""A callback that signals its own process at one exact point of the training loop.

The fault suite loads it into real CLI runs (``callbacks: [{name: "faults_inject:SignalAt"}]``,
with this folder on ``PYTHONPATH``). It does nothing unless the environment arms it::

    APT_TEST_SIGNAL_AT=SIGKILL@batch_end:6      # first micro-batch of step 7 (mid-accumulation)
    APT_TEST_SIGNAL_AT=SIGTERM@step_end:18      # a graceful stop request during step 18
    APT_TEST_SIGNAL_AT=SIGKILL@checkpoint_save:44   # right after the final checkpoint commit
    APT_TEST_SIGNAL_AT=SIGINTx2@batch_end:6         # Ctrl-C pressed twice
    APT_TEST_SIGNAL_GROUP=1                         # to the whole process group (workers too)

``<event>`` is an :class:`~apt.trainops.engine.events.Event` value and ``<step>`` the
``global_step`` the run state shows when that event fires (during the micro-batches of step
``k`` it shows ``k - 1``). The signal is sent once (``xN``: N times in a row), the first time
the point is reached. With ``APT_TEST_SIGNAL_GROUP=1`` it goes to the process group, as a
terminal's Ctrl-C does (start the run in a session of its own). The
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
GROUP_VAR = "APT_TEST_SIGNAL_GROUP"


def parse_spec(spec: str) -> tuple[signal.Signals, str, int, int]:
    """``'SIGINTx2@batch_end:6'`` -> ``(Signals.SIGINT, 'batch_end', 6, 2)``.

    Raises:
        ValueError: the text does not have the form ``SIGNAL[xN]@event:step``.
    """
    sig_part, _, point = spec.partition("@")
    event, _, step = point.partition(":")
    sig_name, _, times = sig_part.partition("x")
    if not (sig_name and event and step):
        raise ValueError(f"{ENV_VAR}={spec!r}: expected SIGNAL[xN]@event:step")
    valid = {e.value for e in Event}
    if event not in valid:
        raise ValueError(f"{ENV_VAR}={spec!r}: unknown event {event!r}; valid: {sorted(valid)}")
    return signal.Signals[sig_name], event, int(step), int(times or 1)


class SignalAt(Callback):
    """Send the armed signal to this process at the armed (event, step); see the module doc."""

    def __init__(self) -> None:
        spec = os.environ.get(ENV_VAR, "")
        self.armed = parse_spec(spec) if spec else None
        self.to_group = os.environ.get(GROUP_VAR) == "1"
        self.fired = False

    def _reached(self, event: str, state: RunState) -> None:
        if self.armed is None or self.fired:
            return
        sig, want_event, want_step, times = self.armed
        if event == want_event and state.global_step == want_step:
            self.fired = True
            for _ in range(times):
                if self.to_group:
                    os.killpg(os.getpgid(0), sig)
                else:
                    os.kill(os.getpid(), sig)  # its handler runs before the next is sent


def _hook(event: str) -> Callable[[SignalAt, RunState, Control], None]:
    def hook(self: SignalAt, state: RunState, control: Control) -> None:
        self._reached(event, state)

    hook.__name__ = f"on_{event}"
    return hook


# The CallbackManager calls only the hooks a class overrides: override every event.
for _event in Event:
    setattr(SignalAt, _event.method_name, _hook(_event.value))
