"""What a run reports to its metric loggers: the training numbers every ``log_interval`` steps,
validation and best-so-far after each evaluation, checkpoint timings after each commit."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tiny_lm import BigramLM, PatternText

from apt.core.config import CallbackSpec, EvalConfig
from apt.trainops.engine import Trainer
from apt.trainops.engine.callbacks import EarlyStopping, build_callback
from apt.trainops.monitoring import read_jsonl

TRAINING = {
    "train_loss",
    "lr",
    "grad_norm",
    "tokens_seen",
    "epoch",
    "step_time",
    "tokens_per_second",
    "peak_memory_gib",
}


def run(tmp_path: Path, name: str = "run", **kwargs: Any) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    options: dict[str, Any] = {
        "max_steps": 8,
        "batch_size": 8,
        "learning_rate": 0.05,
        "save_interval": 4,
        "eval_interval": 2,
        "output_dir": str(tmp_path),
        "experiment_name": name,
        "monitoring": {"log_interval": 2, "progress_bar": False},
        **kwargs,
    }
    trainer = Trainer(
        model=BigramLM(),
        train_dataset=PatternText(padded=False),
        eval_dataset=PatternText(16, seed=1),
        **options,
    )
    trainer.train()
    return read_jsonl(tmp_path / name / "metrics.jsonl")


def test_training_numbers_every_log_interval(tmp_path: Path) -> None:
    records = run(tmp_path)
    training = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in training] == [2, 4, 6, 8]
    for record in training:
        assert set(record) >= TRAINING
        # the interval's tokens over the time its two steps took
        per_step = 8 * 11  # 8 rows of 12 tokens, no padding: 11 targets each
        assert record["tokens_per_second"] * record["step_time"] * 2 == pytest_approx(2 * per_step)
        assert record["peak_memory_gib"] > 0.01  # this process's peak RSS
        assert "mfu" not in record  # a CPU has no known peak
    assert [r["tokens_seen"] for r in training] == [2 * 88, 4 * 88, 6 * 88, 8 * 88]


def pytest_approx(value: float) -> Any:
    import pytest

    return pytest.approx(value, rel=1e-9)


def test_mfu_is_reported_once_a_peak_is_given(tmp_path: Path) -> None:
    records = run(
        tmp_path, monitoring={"log_interval": 2, "progress_bar": False, "peak_flops": 1e9}
    )
    params = sum(p.numel() for n, p in BigramLM().named_parameters() if not n.startswith("emb"))
    for record in (r for r in records if "train_loss" in r):
        expected = record["tokens_per_second"] * 6 * params / 1e9
        assert record["mfu"] == pytest_approx(expected)


def test_best_so_far_follows_eval_monitor_and_checkpoints_report_their_timings(
    tmp_path: Path,
) -> None:
    records = run(tmp_path)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6, 8]
    best, best_step = math.inf, None
    for record in evals:
        if record["val_loss"] < best:
            best, best_step = record["val_loss"], record["step"]
        assert record["best_val_loss"] == best
        assert record["best_val_loss_step"] == best_step
    saves = [r for r in records if "checkpoint_save_seconds" in r]
    assert [r["step"] for r in saves] == [4, 8]
    for record in saves:
        assert 0 < record["checkpoint_blocked_seconds"] <= record["checkpoint_save_seconds"] + 1e-6


def test_best_so_far_is_resumed_with_the_checkpoint(tmp_path: Path) -> None:
    whole = run(tmp_path, "whole")
    run(tmp_path, "split", max_steps=4)
    resumed = run(tmp_path, "split")  # extends the finished 4-step run to 8
    best = {r["step"]: r["best_val_loss"] for r in whole if "best_val_loss" in r}
    assert {r["step"]: r["best_val_loss"] for r in resumed if "best_val_loss" in r} == best


def test_early_stopping_from_yaml_watches_eval_monitor() -> None:
    evaluation = EvalConfig(monitor="val_accuracy", mode="max")
    spec = CallbackSpec.model_validate({"name": "early_stopping", "patience": 2})
    stopper = build_callback(spec, evaluation=evaluation, sink=None, schedules=None)
    assert isinstance(stopper, EarlyStopping)
    assert (stopper.monitor, stopper.mode, stopper.patience) == ("val_accuracy", "max", 2)
    own = CallbackSpec.model_validate({"name": "early_stopping", "monitor": "val_loss"})
    stopper = build_callback(own, evaluation=evaluation, sink=None, schedules=None)
    assert (stopper.monitor, stopper.mode) == ("val_loss", "max")
    assert (EarlyStopping().monitor, EarlyStopping().mode) == ("val_loss", "min")
