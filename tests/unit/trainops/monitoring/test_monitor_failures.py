"""A backend that fails (server unreachable, folder unusable, package missing) costs one
warning naming it and what to check; the other loggers and metrics.jsonl get every point."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import pytest
from monitoring_stores import CANARY, files_with, tensorboard_scalars

from apt.core.config.monitoring import (
    MLflowLoggerConfig,
    MonitoringConfig,
    TensorBoardLoggerConfig,
    WandbLoggerConfig,
)
from apt.trainops.monitoring import (
    JsonlLogger,
    MLflowLogger,
    Monitor,
    TensorBoardLogger,
    WandbLogger,
    build_monitor,
    read_jsonl,
)

STEPS = (10, 20, 30, 40)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def run(monitor: Monitor, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="apt"):
        monitor.start("exp", 0, {"api_token": CANARY})
        for step in STEPS:
            monitor.log({"train_loss": step / 10}, step)
        monitor.finish()


def test_an_unreachable_server_and_an_unusable_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    not_a_folder = tmp_path / "tb-is-a-file"
    not_a_folder.write_text("", encoding="utf-8")
    cfg = MonitoringConfig.model_validate(
        {
            "loggers": [
                {"kind": "console"},
                {"kind": "tensorboard", "log_dir": str(not_a_folder)},
                {"kind": "mlflow", "tracking_uri": f"http://builder:{CANARY}@127.0.0.1:9"},
            ]
        }
    )
    run_dir = tmp_path / "exp"
    monitor = build_monitor(cfg, run_dir=run_dir, output_dir=tmp_path, enabled=True)
    began = time.monotonic()
    run(monitor, caplog)
    assert time.monotonic() - began < 30  # no retry loop against the dead server

    warnings = warnings_of(caplog)
    assert len(warnings) == 2, warnings  # one each; later calls do not warn again
    tb, mlflow = warnings
    assert "the tensorboard logger failed in start" in tb and "FileExistsError" in tb
    assert "monitoring.loggers[tensorboard].log_dir" in tb
    assert "the mlflow logger failed in start" in mlflow and "127.0.0.1:9" in mlflow
    assert "monitoring.loggers[mlflow].tracking_uri" in mlflow
    assert "builder:***@127.0.0.1" in mlflow and CANARY not in " ".join(warnings)
    assert monitor.active == ["jsonl", "console"]
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(STEPS)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert [line.split(":")[0] for line in infos if line.startswith("step ")] == [
        f"step {s}" for s in STEPS
    ]
    state = json.loads((run_dir / "monitoring.json").read_text(encoding="utf-8"))
    assert sorted(state) == ["console", "jsonl"]
    assert files_with(tmp_path, CANARY) == []


def test_a_missing_package_names_its_pip_install_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes `import wandb` / `import mlflow` raise ImportError, as a
    # machine without the extra would.
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    loggers = [
        JsonlLogger(),
        TensorBoardLogger.from_config(TensorBoardLoggerConfig(), output_dir=tmp_path),
        WandbLogger.from_config(WandbLoggerConfig(mode="offline"), output_dir=tmp_path),
        MLflowLogger.from_config(MLflowLoggerConfig(), output_dir=tmp_path),
    ]
    monitor = Monitor(loggers, run_dir=tmp_path / "exp")
    run(monitor, caplog)
    warnings = warnings_of(caplog)
    assert len(warnings) == 2, warnings
    assert "the wandb logger failed in start" in warnings[0]
    assert 'pip install "apt-transformer[wandb]"' in warnings[0]
    assert "the mlflow logger failed in start" in warnings[1]
    assert 'pip install "apt-transformer[mlflow]"' in warnings[1]
    assert monitor.active == ["jsonl", "tensorboard"]
    scalars = tensorboard_scalars(tmp_path / "exp" / "tensorboard", "train_loss")
    assert [step for step, _ in scalars] == list(STEPS)
