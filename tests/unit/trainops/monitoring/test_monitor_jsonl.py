"""metrics.jsonl: the ArtifactManager's line format, and its rewrite when a run resumes."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from apt.trainops.monitoring import JsonlLogger, Monitor, RunInfo, read_jsonl


def started(path: Path, start_step: int = 0) -> JsonlLogger:
    logger = JsonlLogger(path)
    logger.start(RunInfo(run_dir=path.parent, name="exp", start_step=start_step, saved={}))
    return logger


def test_one_strict_json_line_per_call_flushed_at_once(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    logger = started(path)
    logger.log({"train_loss": 2.5, "grad_norm": math.nan, "lr": math.inf}, 10)
    logger.log({}, 11)  # an empty report writes nothing
    # Read before finish(): the line is on disk already (a kill would not lose it).
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"not strict: {c}"))
    assert list(record) == ["step", "time", "train_loss", "grad_norm", "lr"]
    assert record["step"] == 10 and record["train_loss"] == 2.5
    assert record["grad_norm"] is None and record["lr"] is None
    assert isinstance(record["time"], float) and record["time"] == round(record["time"], 3)
    logger.finish()


def test_start_keeps_the_records_up_to_the_resumed_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    logger = started(path)
    for step in (10, 20, 30, 40, 50):
        logger.log({"loss": float(step)}, step)
    logger.finish()
    with path.open("a", encoding="utf-8") as f:
        f.write('{"step": 60, "time": 1.0, "lo')  # the half-written line of a kill
    resumed = started(path, start_step=30)
    resumed.log({"loss": -40.0}, 40)
    resumed.finish()
    assert [(r["step"], r["loss"]) for r in read_jsonl(path)] == [
        (10, 10.0),
        (20, 20.0),
        (30, 30.0),
        (40, -40.0),
    ]
    assert path.read_text(encoding="utf-8").endswith("\n")


def test_an_unreadable_line_inside_the_file_is_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "loss": 1}\nnot json\n{"step": 20, "loss": 2}\n', "utf-8")
    with caplog.at_level(logging.WARNING, logger="apt"):
        started(path, start_step=20).finish()
    assert [r["step"] for r in read_jsonl(path)] == [10, 20]
    assert "not json" not in path.read_text(encoding="utf-8")
    assert [r.getMessage() for r in caplog.records if "line 2" in r.getMessage()]


def test_a_file_with_nothing_to_drop_is_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    text = '{"step": 10,   "loss": 1}\n'  # spacing of its own: a rewrite would change it
    path.write_text(text, encoding="utf-8")
    started(path, start_step=10).finish()
    assert path.read_text(encoding="utf-8") == text


def test_read_jsonl_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_jsonl(tmp_path / "metrics.jsonl") == []


def test_resume_through_the_monitor(tmp_path: Path) -> None:
    monitor = Monitor([JsonlLogger()], run_dir=tmp_path)
    monitor.start("exp", 0, {})
    for step in (10, 20, 30, 40, 50):
        monitor.log({"loss": float(step)}, step)
    del monitor  # killed after step 50; the checkpoint is at step 30
    monitor = Monitor([JsonlLogger()], run_dir=tmp_path)
    monitor.start("exp", 30, {})
    for step in (40, 50, 60):
        monitor.log({"loss": -float(step)}, step)
    monitor.finish()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [
        (10, 10.0),
        (20, 20.0),
        (30, 30.0),
        (40, -40.0),
        (50, -50.0),
        (60, -60.0),
    ]
