"""Built-in callbacks and building callbacks from YAML specs."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from apt.core.config import CallbackSpec
from apt.core.errors import ConfigError
from apt.trainops.engine import Control, EarlyStopping, RunState, TrainingBundle, TrainState
from apt.trainops.engine.callbacks import build_callback


def eval_sequence(cb: EarlyStopping, values: list[float]) -> int | None:
    train = TrainState()
    state = RunState(train, TrainingBundle(torch.nn.Linear(1, 1)))
    control = Control()
    for step, value in enumerate(values, start=1):
        train.global_step = step * 10
        train.metrics["val_loss"] = value
        cb.on_eval_end(state, control)
        if control.should_stop:
            return train.global_step
    return None


def test_early_stopping_stops_after_patience_without_improvement() -> None:
    cb = EarlyStopping(monitor="val_loss", patience=2, min_delta=0.01)
    assert eval_sequence(cb, [3.0, 2.5, 2.495, 2.6, 2.0]) == 40
    assert cb.best == 2.5 and cb.stopped_at_step == 40


def test_early_stopping_state_round_trips_mid_run() -> None:
    first = EarlyStopping(patience=2)
    assert eval_sequence(first, [3.0, 3.1]) is None
    resumed = EarlyStopping(patience=2)
    resumed.load_state_dict(first.state_dict())
    assert eval_sequence(resumed, [3.2]) == 10  # the earlier bad evaluation still counts


def test_early_stopping_mode_max() -> None:
    assert (
        eval_sequence(EarlyStopping(monitor="val_loss", mode="max", patience=1), [1.0, 0.5]) == 20
    )


def test_unknown_callback_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        build_callback(CallbackSpec(name="early_stoping"))
    message = str(info.value)
    assert "did you mean 'early_stopping'" in message.lower()
    assert "progress_bar" in message and "lr_monitor" in message


def test_unknown_option_lists_valid_options() -> None:
    with pytest.raises(ConfigError, match=r"no option 'patiense'.*patience"):
        build_callback(CallbackSpec(name="early_stopping", patiense=3))


def test_user_callback_by_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_callbacks.py").write_text(
        textwrap.dedent("""
        from apt.trainops.engine import Callback

        class Welcome(Callback):
            def __init__(self, greeting: str = "hi") -> None:
                self.greeting = greeting
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cb = build_callback(CallbackSpec(name="my_callbacks:Welcome", greeting="hello"))
    assert type(cb).__name__ == "Welcome" and cb.greeting == "hello"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="cannot import module"):
        build_callback(CallbackSpec(name="no_such_module_xyz:Welcome"))
    with pytest.raises(ConfigError, match="subclass of"):
        build_callback(CallbackSpec(name="my_callbacks:Callback2"))
    sys.modules.pop("my_callbacks", None)


def test_the_progress_bar_shows_the_recent_rate_not_the_average(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from apt.trainops.engine import ProgressBar

    clock = [0.0]
    monkeypatch.setattr("apt.trainops.engine.callbacks.builtin.time.perf_counter", lambda: clock[0])
    train = TrainState()
    state = RunState(train, TrainingBundle(torch.nn.Linear(1, 1)), max_steps=30)
    bar, control = ProgressBar(window=5), Control()
    bar.on_train_start(state, control)
    clock[0] += 60.0  # start-up and compilation before the first step
    for step in range(1, 11):
        bar.on_step_start(state, control)
        clock[0] += 0.1 if step > 1 else 30.0  # the first step compiles
        train.global_step, train.tokens_seen = step, train.tokens_seen + 1000
        bar.on_step_end(state, control)
        clock[0] += 20.0 if step % 4 == 0 else 0.0  # an evaluation between steps
    assert bar._bar.postfix.endswith("tok_s=10,000")  # 5000 tokens in 0.5 s of steps
    with caplog.at_level("INFO", logger="apt"):
        bar.on_train_end(state, control)
    assert "10,000 tokens/s over the last 5 steps" in caplog.text
    assert "76 tokens/s on average" in caplog.text  # 10,000 tokens in 130.9 s
