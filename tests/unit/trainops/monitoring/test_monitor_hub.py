"""The Monitor's own rules, seen through a recording logger (the Lightning hook-test idea) and
the real metrics.jsonl: call order, hparams once per logger run, skipped steps after a resume,
monitoring.json, failure isolation, and the no-op of the other ranks."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from apt.core.config.monitoring import MonitoringConfig
from apt.trainops.monitoring import (
    ConsoleLogger,
    JsonlLogger,
    MetricLogger,
    Monitor,
    RunInfo,
    build_monitor,
    read_jsonl,
)


class Recording(MetricLogger):
    """Records every call; ``fail_in`` names a method that raises, ``fail_at`` a step."""

    kind = "recording"
    can_delete = False
    fix = "look at the recording"

    def __init__(self, fail_in: str = "", fail_at: int | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail_in, self.fail_at = fail_in, fail_at

    @classmethod
    def from_config(cls, cfg: Any, *, output_dir: Path) -> Recording:
        return cls()

    def _record(self, *call: Any) -> None:
        self.calls.append(call)
        if call[0] == self.fail_in and (self.fail_at is None or call[-1] == self.fail_at):
            raise OSError(28, f"No space left on device (https://u:canary-xyz@host, {call[0]})")

    def start(self, run: RunInfo) -> None:
        self._record("start", run.start_step, run.saved)

    def log_hparams(self, params: dict[str, Any]) -> None:
        self._record("log_hparams", params)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._record("log", dict(metrics), step)

    def finish(self) -> None:
        self._record("finish")

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": "r-1"}


class Deleting(Recording):
    kind = "deleting"
    can_delete = True


def steps_logged(logger: Recording) -> list[int]:
    return [call[2] for call in logger.calls if call[0] == "log"]


def state(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "monitoring.json").read_text(encoding="utf-8"))


def test_the_call_sequence_of_a_new_run(tmp_path: Path) -> None:
    rec = Recording()
    monitor = Monitor([rec], run_dir=tmp_path)
    monitor.start("exp", 0, {"hf_token": "hf_abc", "lr": 0.1})
    monitor.log({"loss": 2.0}, 10)
    monitor.log({}, 15)  # nothing to send
    monitor.log({"loss": 1.0}, 20)
    monitor.finish()
    monitor.finish()  # a second finish (a finally block) does nothing
    assert rec.calls == [
        ("start", 0, {}),
        ("log_hparams", {"hf_token": "***", "lr": 0.1}),
        ("log", {"loss": 2.0}, 10),
        ("log", {"loss": 1.0}, 20),
        ("finish",),
    ]
    assert state(tmp_path) == {"recording": {"run_id": "r-1", "last_step": 20}}


def test_a_resumed_run_skips_what_a_non_deleting_logger_holds(tmp_path: Path) -> None:
    first, first_deleting = Recording(), Deleting()
    monitor = Monitor([first, first_deleting], run_dir=tmp_path)
    monitor.start("exp", 0, {"lr": 0.1})
    for step in (10, 20, 30, 40, 50):
        monitor.log({"loss": float(step)}, step)
    del monitor  # killed: no finish

    rec, deleting = Recording(), Deleting()
    monitor = Monitor([rec, deleting], run_dir=tmp_path)
    monitor.start("exp", 30, {"lr": 0.1})
    for step in (40, 50, 60):
        monitor.log({"loss": -float(step)}, step)
    # Each logger is started with what it saved; no hparams again (its store has them).
    assert rec.calls[0] == ("start", 30, {"run_id": "r-1"})
    assert deleting.calls[0] == ("start", 30, {"run_id": "r-1"})
    assert not [c for c in rec.calls + deleting.calls if c[0] == "log_hparams"]
    assert steps_logged(rec) == [60]
    assert steps_logged(deleting) == [40, 50, 60]
    assert state(tmp_path)["recording"]["last_step"] == 60
    assert state(tmp_path)["deleting"]["last_step"] == 60


def test_a_logger_new_to_a_resumed_run_gets_hparams_and_every_step(tmp_path: Path) -> None:
    Monitor([Recording()], run_dir=tmp_path).start("exp", 0, {})
    added = Deleting()
    monitor = Monitor([Recording(), added], run_dir=tmp_path)
    monitor.start("exp", 30, {"lr": 0.1})
    monitor.log({"loss": 1.0}, 40)
    assert added.calls[:2] == [("start", 30, {}), ("log_hparams", {"lr": 0.1})]
    assert steps_logged(added) == [40]


@pytest.mark.parametrize("phase", ["start", "log_hparams", "log", "finish"])
def test_a_failing_logger_warns_once_and_is_switched_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, phase: str
) -> None:
    broken, healthy = Recording(fail_in=phase), Deleting()
    monitor = Monitor([JsonlLogger(), broken, healthy], run_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="apt"):
        monitor.start("exp", 0, {"lr": 0.1})
        for step in (10, 20, 30):
            monitor.log({"loss": float(step)}, step)
        monitor.finish()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"the recording logger failed in {phase}" in warnings[0]
    assert "No space left on device" in warnings[0] and "look at the recording" in warnings[0]
    assert "canary-xyz" not in warnings[0] and "https://u:***@host" in warnings[0]
    assert "metrics.jsonl keeps every point" in warnings[0]
    # Nothing is called on it after the failure; the others get everything.
    assert broken.calls[-1][0] == phase
    assert steps_logged(healthy) == [10, 20, 30] and healthy.calls[-1] == ("finish",)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [10, 20, 30]
    assert monitor.active == ["jsonl", "deleting"]


def test_a_logger_that_failed_keeps_its_saved_state_for_a_later_run(tmp_path: Path) -> None:
    monitor = Monitor([Recording()], run_dir=tmp_path)
    monitor.start("exp", 0, {})
    monitor.log({"loss": 1.0}, 10)
    Monitor([Recording(fail_in="start")], run_dir=tmp_path).start("exp", 10, {})
    assert state(tmp_path)["recording"] == {"run_id": "r-1", "last_step": 10}


def test_a_logger_failing_at_one_step_keeps_its_last_good_step(tmp_path: Path) -> None:
    monitor = Monitor([Recording(fail_in="log", fail_at=30)], run_dir=tmp_path)
    monitor.start("exp", 0, {})
    for step in (10, 20, 30, 40):
        monitor.log({"loss": 1.0}, step)
    assert state(tmp_path)["recording"]["last_step"] == 20


def test_a_corrupt_state_file_warns_and_starts_fresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "monitoring.json").write_text('{"recording": {"run_id": ', encoding="utf-8")
    rec = Recording()
    with caplog.at_level(logging.WARNING, logger="apt"):
        Monitor([rec], run_dir=tmp_path).start("exp", 30, {"lr": 0.1})
    assert rec.calls[:2] == [("start", 30, {}), ("log_hparams", {"lr": 0.1})]
    assert any("monitoring.json cannot be read" in r.getMessage() for r in caplog.records)
    assert state(tmp_path) == {"recording": {"run_id": "r-1"}}


def test_the_state_file_is_replaced_whole(tmp_path: Path) -> None:
    monitor = Monitor([Recording()], run_dir=tmp_path)
    monitor.start("exp", 0, {})
    monitor.log({"loss": 1.0}, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["monitoring.json"]  # no tmp left


def test_a_disabled_monitor_does_nothing(tmp_path: Path) -> None:
    rec = Recording()
    monitor = Monitor([rec], run_dir=tmp_path, enabled=False)
    monitor.start("exp", 0, {"lr": 0.1})
    monitor.log({"loss": 1.0}, 10)
    monitor.finish()
    assert rec.calls == [] and list(tmp_path.iterdir()) == []


def test_misuse_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="recording"):
        Monitor([Recording(), Recording()], run_dir=tmp_path)
    monitor = Monitor([Recording()], run_dir=tmp_path)
    with pytest.raises(RuntimeError, match="outside start"):
        monitor.log({"loss": 1.0}, 10)
    monitor.start("exp", 0, {})
    with pytest.raises(RuntimeError, match="twice"):
        monitor.start("exp", 0, {})


def test_build_monitor_puts_metrics_jsonl_first(tmp_path: Path) -> None:
    cfg = MonitoringConfig.model_validate({"loggers": [{"kind": "console"}, {"kind": "jsonl"}]})
    monitor = build_monitor(cfg, run_dir=tmp_path / "exp", output_dir=tmp_path, enabled=True)
    assert monitor.active == ["jsonl", "console"]
    assert build_monitor(cfg, run_dir=tmp_path, output_dir=tmp_path, enabled=False).active == []


def test_console_and_jsonl_through_the_monitor(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monitor = Monitor([JsonlLogger(), ConsoleLogger()], run_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="apt"):
        monitor.start("exp", 0, {})
        monitor.log({"train_loss": 2.341, "lr": 3e-4, "tokens_seen": 123456.0}, 20)
        monitor.finish()
    lines = [r.getMessage() for r in caplog.records if r.name == "apt"]
    assert lines == ["step 20: train_loss=2.3410, lr=3.00e-04, tokens_seen=1.23e+05"]
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["train_loss"] == 2.341


def test_hparams_reach_the_loggers_as_plain_json(tmp_path: Path) -> None:
    rec = Recording()
    Monitor([rec], run_dir=tmp_path).start(
        "exp", 0, {"data": {"path": Path("/data/x"), "betas": (0.9, 0.95)}, "password": "pw"}
    )
    assert rec.calls[1] == (
        "log_hparams",
        {"data": {"path": "/data/x", "betas": [0.9, 0.95]}, "password": "***"},
    )
