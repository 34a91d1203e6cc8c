"""The 1.x curriculum executor, value by value against the 1.x formulas written out here.

The formulas (seed 000): ``lerp(a, b, t) = a + (b - a) t``; ``cosine(a, b, t) = b + (a - b)(1 +
cos(pi t)) / 2``; epoch values at ``t = epoch / total_epochs``; step values at ``t = step /
total_steps``, after a warmup ramp ``start * step / warmup`` over the first ``warmup`` steps and
then over ``(step - warmup) / (total_steps - warmup)``.
"""

from __future__ import annotations

import logging
import math
import warnings
from types import SimpleNamespace
from typing import Any

import pytest

from apt.core.config import config_from_dict
from apt.core.errors import ConfigError

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from apt_model.training.callbacks import (
        ScheduleExecutor,
        cosine_anneal,
        get_interpolator,
        lerp,
    )

#: The curriculum of seed 000's gpt5_moe_reasoning profile.
GPT5_MOE_REASONING: dict[str, Any] = {
    "enable_moe_at_epoch": 2,
    "enable_align_at_epoch": 3,
    "enable_voter_at_epoch": 5,
    "route_temp": {"start": 1.5, "end": 0.8, "by": "epoch"},
    "moe_capacity": {"start": 1.5, "end": 1.1, "by": "epoch"},
    "align_weight": {"start": 0.0, "end": 0.3, "by": "step", "warmup": 5000},
}


class Recorder:
    """A 1.x module: ``enable(flag)`` and any ``set_<attribute>(value)``, each call recorded
    in the shared log as ``(module, what, value)``."""

    def __init__(self, name: str, log: list[tuple[str, str, Any]]) -> None:
        self._name, self._log = name, log

    def enable(self, flag: bool) -> None:
        self._log.append((self._name, "enable", flag))

    def __getattr__(self, attr: str) -> Any:
        if not attr.startswith("set_"):
            raise AttributeError(attr)
        return lambda value: self._log.append((self._name, attr[4:], value))


def modules(
    log: list[tuple[str, str, Any]], names: tuple[str, ...] = ("moe", "align", "voter", "router")
) -> dict[str, Recorder]:
    return {name: Recorder(name, log) for name in names}


def executor(schedules: Any, log: list[Any], epochs: int, steps: int) -> ScheduleExecutor:
    return ScheduleExecutor(SimpleNamespace(schedules=schedules), modules(log), epochs, steps)


# ----------------------------------------------------------------------------- interpolators
@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0, 1.5])
def test_interpolators(t: float) -> None:
    assert lerp(2.0, 4.0, t) == pytest.approx(2.0 + 2.0 * t)
    assert cosine_anneal(2.0, 4.0, t) == pytest.approx(4.0 - 2.0 * (1 + math.cos(math.pi * t)) / 2)
    assert get_interpolator("linear") is lerp and get_interpolator() is lerp
    assert get_interpolator("cosine") is cosine_anneal


def test_unknown_interpolator_type_falls_back_to_linear() -> None:
    assert get_interpolator("exponential") is lerp
    log: list[Any] = []
    ex = executor(
        {"route_temp": {"start": 1.0, "end": 0.0, "by": "epoch", "type": "nope"}}, log, 4, 1
    )
    ex.on_epoch_start(1)
    assert log == [("router", "temperature", 0.75)]


# ------------------------------------------------------------------------ seed 000's curriculum
def test_gpt5_moe_reasoning_epoch_by_epoch() -> None:
    log: list[Any] = []
    ex = executor(GPT5_MOE_REASONING, log, epochs=6, steps=20000)
    for epoch in range(6):
        log.clear()
        ex.on_epoch_start(epoch)
        switched = {"moe": 2, "align": 3, "voter": 5}
        expected = [(name, "enable", True) for name, at in switched.items() if at == epoch]
        expected += [
            ("router", "temperature", pytest.approx(1.5 + (0.8 - 1.5) * epoch / 6)),
            ("moe", "capacity_factor", pytest.approx(1.5 + (1.1 - 1.5) * epoch / 6)),
        ]
        assert log == expected, epoch


def test_gpt5_moe_reasoning_align_weight_every_step() -> None:
    total, warmup = 20000, 5000
    log: list[Any] = []
    ex = executor(GPT5_MOE_REASONING, log, epochs=6, steps=total)
    for step in range(1, total + 1):
        ex.on_step(step)
    got = [value for module, attr, value in log]
    assert [(m, a) for m, a, _ in log] == [("align", "loss_weight")] * total
    expected = [
        0.0 * s / warmup if s < warmup else 0.0 + 0.3 * (s - warmup) / (total - warmup)
        for s in range(1, total + 1)
    ]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert got[-1] == pytest.approx(0.3) and got[warmup - 2] == 0.0


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_step_warmup_ramps_from_zero_to_start_then_anneals(kind: str) -> None:
    total, warmup, start, end = 50, 10, 2.0, 0.5
    spec = {"start": start, "end": end, "by": "step", "warmup": warmup, "type": kind}
    log: list[Any] = []
    ex = executor({"vote_threshold": spec}, log, epochs=1, steps=total)
    for step in range(total + 1):
        ex.on_step(step)

    def formula(s: int) -> float:
        if s < warmup:
            return start * s / warmup
        u = (s - warmup) / (total - warmup)
        if kind == "cosine":
            return end + (start - end) * (1 + math.cos(math.pi * u)) / 2
        return start + (end - start) * u

    assert [entry[:2] for entry in log] == [("voter", "entropy_threshold")] * (total + 1)
    assert [v for *_, v in log] == pytest.approx([formula(s) for s in range(total + 1)], abs=1e-12)


def test_epoch_schedules_ignore_warmup_and_step_ones_wait_for_steps() -> None:
    log: list[Any] = []
    ex = executor(
        {
            "route_temp": {"start": 1.0, "end": 2.0, "by": "epoch", "warmup": 3},
            "moe_capacity": {"start": 1.0, "end": 2.0, "by": "step"},
        },
        log,
        epochs=4,
        steps=8,
    )
    ex.on_epoch_start(2)
    assert log == [("router", "temperature", 1.5)]
    log.clear()
    ex.on_step(2)
    assert log == [("moe", "capacity_factor", 1.25)]


def test_enable_happens_at_the_exact_epoch_only_and_missing_modules_are_skipped() -> None:
    log: list[Any] = []
    ex = ScheduleExecutor(
        SimpleNamespace(schedules={"enable_moe_at_epoch": 2, "enable_align_at_epoch": 1}),
        modules(log, names=("moe",)),  # a model without align: 1.x skipped it
        3,
        10,
    )
    for epoch in range(3):
        ex.on_epoch_start(epoch)
    assert log == [("moe", "enable", True)]


def test_a_config_without_schedules_does_nothing_and_a_2_0_config_works() -> None:
    log: list[Any] = []
    ex = ScheduleExecutor(object(), modules(log), 2, 2)
    ex.on_epoch_start(0)
    ex.on_step(1)
    assert ex.schedules == {} and log == []
    cfg = config_from_dict(
        {
            "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "moe": {}},
            "training": {"max_steps": 4},
            "schedules": {"enable_moe_at_epoch": 1, "route_temp": {"start": 1.0, "end": 0.5}},
        }
    )
    ex = ScheduleExecutor(cfg, modules(log), total_epochs=2, total_steps=4)
    ex.on_epoch_start(1)  # the 2.0 schema filled in by: epoch
    assert log == [("moe", "enable", True), ("router", "temperature", 0.75)]


# ----------------------------------------------------------------------------- 1.x edge cases
def test_warmup_equal_to_total_steps_fails_clearly_where_1x_divided_by_zero() -> None:
    log: list[Any] = []
    spec = {"start": 1.0, "end": 0.0, "by": "step", "warmup": 10}
    ex = executor({"align_weight": spec}, log, epochs=1, steps=10)
    for step in range(10):  # the warmup itself keeps its 1.x values
        ex.on_step(step)
    assert [v for *_, v in log] == pytest.approx([s / 10 for s in range(10)])
    with pytest.raises(ConfigError, match=r"schedules.align_weight: warmup \(10\) must be smaller"):
        ex.on_step(10)


def test_warmup_longer_than_the_run_fails_once_the_warmup_is_over() -> None:
    log: list[Any] = []
    spec = {"start": 1.0, "end": 0.0, "by": "step", "warmup": 20}
    ex = executor({"align_weight": spec}, log, epochs=1, steps=10)
    for step in range(11):
        ex.on_step(step)  # 1.x values: still ramping at the run's end
    assert log[-1] == ("align", "loss_weight", pytest.approx(0.5))
    with pytest.raises(ConfigError, match="no steps are left to anneal over"):
        ex.on_step(25)  # 1.x: a negative span, a value past start away from end


def test_schedules_that_are_not_a_mapping_fail_clearly() -> None:
    with pytest.raises(ConfigError, match=r"config.schedules must be a mapping.*got NoneType"):
        ScheduleExecutor(SimpleNamespace(schedules=None), {}, 1, 1)
    with pytest.raises(ConfigError, match=r"schedules.route_temp.start: must be a number"):
        ScheduleExecutor(
            SimpleNamespace(schedules={"route_temp": {"start": "hot", "end": 1, "by": "epoch"}}),
            {},
            1,
            1,
        )


def test_entries_1x_ignored_are_still_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    schedules = {
        "route_temp": {"start": 1.0, "end": 0.0},  # no by
        "moe_capacity": {"start": 1.0, "by": "epoch"},  # no end
        "route_temperature": {"start": 1.0, "end": 0.0, "by": "epoch"},  # not a 1.x name
        "enable_moe_at_step": 3,
    }
    log: list[Any] = []
    with caplog.at_level(logging.WARNING, logger="apt.compat"):
        ex = executor(schedules, log, epochs=2, steps=4)
    for key in schedules:
        assert any(f"ignores schedules.{key}" in r.getMessage() for r in caplog.records), key
    for epoch in range(2):
        ex.on_epoch_start(epoch)
    for step in range(5):
        ex.on_step(step)
    assert log == []
