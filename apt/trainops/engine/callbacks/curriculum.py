"""``ScheduleCallback`` (runs a :class:`ScheduleExecutor`) and ``EntropyBasedVotingCallback``."""

from __future__ import annotations

from typing import Any

from apt.core.config import SchedulesConfig
from apt.trainops.distributed import unwrap_model
from apt.trainops.engine.callbacks.base import Callback
from apt.trainops.engine.curriculum import ScheduleExecutor
from apt.trainops.engine.state import Control, RunState

__all__ = ["EntropyBasedVotingCallback", "ScheduleCallback"]


class ScheduleCallback(Callback):
    """Applies ``schedules:``: epoch-driven entries at ``epoch_start``, step-driven ones at
    ``step_start``, and everything at ``train_start`` (so a resumed run is in the same state)."""

    def __init__(self, *, schedules: SchedulesConfig) -> None:
        self.schedules = schedules
        self.executor: ScheduleExecutor | None = None
        self._pending: dict[str, Any] = {}

    def on_train_start(self, state: RunState, control: Control) -> None:
        self.executor = ScheduleExecutor(
            self.schedules,
            model=unwrap_model(state.model),
            total_steps=state.max_steps,
            steps_per_epoch=state.steps_per_epoch,
        )
        if self._pending:
            self.executor.load_state_dict(self._pending)
        self.executor.apply(epoch=state.epoch, step=state.global_step, clock="all")

    def on_epoch_start(self, state: RunState, control: Control) -> None:
        assert self.executor is not None
        self.executor.apply(epoch=state.epoch, step=state.global_step, clock="epoch")

    def on_step_start(self, state: RunState, control: Control) -> None:
        assert self.executor is not None
        self.executor.apply(epoch=state.epoch, step=state.global_step, clock="step")

    def state_dict(self) -> dict[str, Any]:
        return self.executor.state_dict() if self.executor is not None else dict(self._pending)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = dict(state)
        if self.executor is not None:
            self.executor.load_state_dict(state)


class EntropyBasedVotingCallback(Callback):
    """Switches the voter on while the model is uncertain: after each evaluation, the voter is
    enabled when the mean next-token entropy (``val_entropy``) exceeds ``threshold`` and
    disabled otherwise.

    Args:
        threshold: entropy (nats) above which voting is worth its cost.
        monitor: the metric holding the mean entropy.
    """

    def __init__(self, threshold: float = 2.2, monitor: str = "val_entropy") -> None:
        self.threshold = threshold
        self.monitor = monitor
        self.decisions: list[tuple[int, bool]] = []

    def on_eval_end(self, state: RunState, control: Control) -> None:
        entropy = state.metrics.get(self.monitor)
        model: Any = unwrap_model(state.model)  # models declare controllable_modules()
        voter = dict(model.controllable_modules()).get("voter")
        if entropy is None or voter is None:
            return
        want = entropy > self.threshold
        if bool(voter.enabled) != want:
            voter.enable() if want else voter.disable()
        self.decisions.append((state.global_step, want))

    def state_dict(self) -> dict[str, Any]:
        return {"decisions": [list(d) for d in self.decisions]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decisions = [(int(s), bool(w)) for s, w in state.get("decisions", [])]
