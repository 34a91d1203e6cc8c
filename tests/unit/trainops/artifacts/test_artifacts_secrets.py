"""No secret reaches the run folder or the terminal: a canary put everywhere a user may put a
credential is found in no file under the run folder, nor on the console."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import yaml

from apt.core.config import config_from_dict
from apt.core.logs import ConsoleHandler
from apt.trainops.artifacts import ArtifactManager

CANARY = "canary-7f3a"
URI = f"https://user:{CANARY}@host/x"


def test_the_canary_is_in_no_file_of_the_run_folder(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    apt_logger: logging.Logger,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MY_SERVICE_TOKEN", CANARY)  # not allow-listed: not even named
    monkeypatch.setenv("NCCL_SOCKET_TOKEN", CANARY)  # allow-listed prefix, secret name
    monkeypatch.setenv("PYTORCH_STORE_URL", URI)  # allow-listed, credentials in a URI
    monkeypatch.setattr(
        sys,
        "argv",
        ["apt", "train", "--set", f"callbacks.0.args.api_token={CANARY}", "--hf-token", CANARY],
    )
    cfg = config_from_dict(
        {
            "data": {"source": "files", "train_files": [URI]},
            "callbacks": [{"name": "mypkg.upload:Upload", "args": {"api_token": CANARY}}],
        }
    )
    config = cfg.to_dict()
    assert config["callbacks"][0]["args"]["api_token"] == CANARY  # the canary is really there
    provenance = {
        **cfg.provenance,
        "callbacks.0.args.api_token": f"--set callbacks.0.args.api_token={CANARY}",
        "data.train_files": f"--set data.train_files=[{URI}]",
    }
    apt_logger.addHandler(ConsoleHandler(always=True))
    apt_logger.propagate = False

    manager = ArtifactManager(output_dir=tmp_path, experiment_name="run")
    manager.lock()
    manager.attach_log_file()
    manager.save_config(config, provenance)
    manager.save_environment({"note": f"started with {URI}"})
    apt_logger.info("reading %s", URI)
    apt_logger.warning(f"retrying {URI}")
    manager.save_logs([f"pushed to {URI}"])
    for step in (1, 2):
        manager.log_metrics({"train_loss": 3.0 / step, "lr": 1e-3, "val_loss": 3.5 / step}, step)
    manager.save_plots()
    manager.close()
    manager.unlock()

    run = tmp_path / "run"
    files = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    expected = ["config.yaml", "env.json", "logs/train.log", "metrics.jsonl", "provenance.json"]
    assert set(expected) <= set(files), files
    leaked = [name for name in files if CANARY.encode() in (run / name).read_bytes()]
    assert leaked == []
    assert CANARY not in capsys.readouterr().err

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["callbacks"][0]["args"]["api_token"] == "***"
    assert saved["data"]["train_files"] == ["https://user:***@host/x"]
    log_text = (run / "logs" / "train.log").read_text()
    assert "reading https://user:***@host/x" in log_text
    assert "retrying https://user:***@host/x" in log_text
    assert "pushed to https://user:***@host/x" in log_text
    env_text = (run / "env.json").read_text()
    assert '"NCCL_SOCKET_TOKEN": "***"' in env_text and "MY_SERVICE_TOKEN" not in env_text
