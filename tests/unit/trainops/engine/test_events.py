"""Events and callbacks stay in one-to-one correspondence; dispatch order; read-only state."""

from __future__ import annotations

import inspect

import pytest
import torch

from apt.trainops.engine import (
    Callback,
    CallbackManager,
    Control,
    Event,
    RunState,
    TrainingBundle,
    TrainState,
)


def test_every_event_has_exactly_one_callback_method_and_back() -> None:
    hooks = {
        name
        for name, _ in inspect.getmembers(Callback, inspect.isfunction)
        if name.startswith("on_")
    }
    assert hooks == {e.method_name for e in Event}
    assert len(hooks) == len(Event) == 17


class Recorder(Callback):
    def __init__(self, tag: str, log: list[str]) -> None:
        self.tag, self.log = tag, log

    def on_train_start(self, state: RunState, control: Control) -> None:
        self.log.append(f"{self.tag}:train_start")

    def on_train_end(self, state: RunState, control: Control) -> None:
        self.log.append(f"{self.tag}:train_end")

    def on_after_backward(self, state: RunState, control: Control) -> None:
        self.log.append(f"{self.tag}:after_backward")


def make_state() -> RunState:
    return RunState(TrainState(), TrainingBundle(torch.nn.Linear(2, 2)))


def test_end_and_after_events_run_in_reverse_order() -> None:
    log: list[str] = []
    manager = CallbackManager([Recorder("a", log), Recorder("b", log)])
    state, control = make_state(), Control()
    for event in (Event.TRAIN_START, Event.AFTER_BACKWARD, Event.TRAIN_END, Event.STEP_START):
        manager.fire(event, state, control)
    assert log == [
        "a:train_start",
        "b:train_start",
        "b:after_backward",
        "a:after_backward",
        "b:train_end",
        "a:train_end",
    ]


def test_run_state_cannot_be_reassigned_but_exposes_live_objects() -> None:
    train = TrainState(global_step=3, last_loss=torch.tensor(1.5))
    model = torch.nn.Linear(2, 2)
    state = RunState(train, TrainingBundle(model), rank=1, world_size=2)
    assert (state.global_step, state.last_loss, state.rank, state.is_main) == (3, 1.5, 1, False)
    assert state.model is model
    with pytest.raises(AttributeError, match="read-only"):
        state.global_step = 4  # type: ignore[misc]
    with pytest.raises(AttributeError):
        state.epoch = 1  # type: ignore[misc]
    train.global_step = 5  # the loop's own counter moves; the view follows
    assert state.global_step == 5
    state.metrics["val_loss"] = 0.0  # a copy: the run's metrics are untouched
    assert "val_loss" not in train.metrics


def test_stateful_callbacks_round_trip_and_duplicate_keys_fail() -> None:
    class Counter(Callback):
        def __init__(self) -> None:
            self.n = 0

        def state_dict(self) -> dict[str, int]:
            return {"n": self.n}

        def load_state_dict(self, state: dict[str, int]) -> None:
            self.n = state["n"]

    a = Counter()
    a.n = 7
    saved = CallbackManager([a]).state_dict()
    b = Counter()
    CallbackManager([b]).load_state_dict(saved)
    assert b.n == 7 and saved == {"Counter": {"n": 7}}
    with pytest.raises(ValueError, match="share the state key"):
        CallbackManager([a, Counter()]).state_dict()


def test_train_state_json_round_trip() -> None:
    state = TrainState(
        epoch=2,
        global_step=10,
        batch_in_epoch=3,
        tokens_seen=99,
        last_loss=torch.tensor(2.0),
        metrics={"val_loss": 1.0},
    )
    back = TrainState.from_dict(state.to_dict())
    assert back.to_dict() == state.to_dict() and back.last_loss == 2.0
