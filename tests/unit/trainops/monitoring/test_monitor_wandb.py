"""W&B: a real offline run, read back with wandb's own reader of its transaction log
(``wandb leet inspect --json``)."""

from __future__ import annotations

import json
from pathlib import Path

from monitoring_stores import (
    CANARY,
    HPARAMS,
    files_with,
    wandb_config,
    wandb_history,
    wandb_records,
)

from apt.core.config.monitoring import WandbLoggerConfig
from apt.trainops.monitoring import JsonlLogger, Monitor, WandbLogger


def test_a_resumed_run_continues_the_same_wandb_run(wandb_offline: Path) -> None:
    run_dir = wandb_offline / "runs" / "exp"
    cfg = WandbLoggerConfig(project="apt-tests", mode="offline", tags=["unit"])

    first_wandb = WandbLogger(cfg)
    first = Monitor([JsonlLogger(), first_wandb], run_dir=run_dir)
    first.start("exp", 0, HPARAMS)
    for step in (10, 20, 30, 40, 50):
        first.log({"train_loss": float(step), "lr": 1e-3}, step)
    # The process is killed after step 50 (its checkpoint is at 30): the Monitor is never
    # finished. A killed W&B run keeps its points up to its last transaction-log flush (every
    # 0.1 s with our settings) and the last step's row only once a later step or finish()
    # closes it; this test closes the first W&B run itself (waiting for a flush would need a
    # sleep), so its file holds all five steps.
    first_wandb.finish()
    del first
    run_id = json.loads((run_dir / "monitoring.json").read_text("utf-8"))["wandb"]["run_id"]

    second_wandb = WandbLogger(cfg)
    second = Monitor([JsonlLogger(), second_wandb], run_dir=run_dir)
    second.start("exp", 30, {"changed": "not sent: the W&B run has its config"})
    for step in (40, 50, 60):
        second.log({"train_loss": -float(step), "lr": 1e-3}, step)
    second.finish()

    assert second_wandb.run_id == run_id
    runs = wandb_records(run_dir / "wandb", run_id)
    assert len(runs) == 2  # one offline run folder per process, both of the same W&B run
    for records in runs:
        (run,) = [r["run"] for r in records if r["type"] == "run"]
        assert run["run_id"] == run_id and run["project"] == "apt-tests"
        assert run["display_name"] == "exp" and run["tags"] == ["unit"]
    # 40 and 50 from the first process (W&B keeps what it got), 60 from the second.
    assert wandb_history(runs, "train_loss") == [
        (10, 10.0),
        (20, 20.0),
        (30, 30.0),
        (40, 40.0),
        (50, 50.0),
        (60, -60.0),
    ]
    updates = [u for u in wandb_config(runs) if set(u) - {"_wandb"}]
    assert updates == [
        {
            "model": {"num_layers": 2, "hidden_size": 16, "dropout": 0.1, "tied": True},
            "training": {"lr": 3e-4, "optimizer": {"kind": "adamw", "betas": [0.9, 0.95]}},
            "data": {"api_token": "***", "source": "https://u:***@host/data"},
            "note": None,
        }
    ]
    assert files_with(wandb_offline, CANARY) == []


def test_nothing_of_the_machine_is_recorded(wandb_offline: Path) -> None:
    run_dir = wandb_offline / "exp"
    logger = WandbLogger(WandbLoggerConfig(project="apt-tests", mode="offline"))
    monitor = Monitor([logger], run_dir=run_dir)
    monitor.start("exp", 0, {})
    print("console text W&B must not capture")
    monitor.log({"train_loss": 1.0}, 1)
    monitor.finish()
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    # No console log, code, requirements, git or machine metadata file.
    assert sorted(p.name for p in (folder / "files").iterdir()) == []
    assert files_with(wandb_offline, "console text W&B must not capture") == []
    records = wandb_records(run_dir / "wandb", logger.run_id or "")[0]
    kinds = {r["type"] for r in records}
    # No system metrics, captured console, environment (command line, machine) or files.
    assert not kinds & {"stats", "output", "output_raw", "environment", "files"}, kinds
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert "git" not in run and "program" not in run
