"""A run with TensorBoard, W&B (offline) and MLflow (sqlite) on, killed with SIGKILL and resumed
by the same command: every store, read back with its own reader, has monotonic steps and the
values of an uninterrupted run; canary secrets reach no file, log line or logged parameter; a
backend that fails does not stop training.

The run is the fault suite's profile (deterministic on CPU), cut to 20 steps with a checkpoint
every 5: the kill as step 14 starts loses steps 11-13, which the resumed run trains again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from faults_harness import EXPERIMENT, SHIPPED_PROFILE, Case, last_losses, metric_records
from monitoring_stores import (
    mlflow_history,
    mlflow_run,
    tensorboard_scalars,
    wandb_history,
    wandb_records,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]

CANARY = "canary-5e1f9d"
STEPS = 20

PROFILE = f"""\
extends: {SHIPPED_PROFILE}
training:
  max_steps: {STEPS}
callbacks:
  - {{name: "faults_inject:SignalAt"}}
  - name: "canary_callback:Canary"
    api_token: {CANARY}
    endpoint: "https://builder:{CANARY}@tracker.example.com/api"
monitoring:
  loggers:
    - {{kind: tensorboard}}
    - {{kind: wandb, project: apt-tests, mode: offline}}
    - {{kind: mlflow, experiment: apt-tests}}
"""


def tracker_env(workdir: Path) -> dict[str, str]:
    return {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(workdir),
        "WANDB_CONFIG_DIR": str(workdir / ".wandb-config"),
        "WANDB_CACHE_DIR": str(workdir / ".wandb-cache"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
        "SERVICE_ACCESS_TOKEN": CANARY,
    }


def case(folder: Path) -> Case:
    folder.mkdir(parents=True)
    profile = folder / "monitored.yaml"
    profile.write_text(PROFILE, encoding="utf-8")
    return Case(folder, profile)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    """An uninterrupted run, and the same run killed after step 13 then resumed."""
    root = tmp_path_factory.mktemp("monitoring")
    golden, resumed = case(root / "golden"), case(root / "resumed")
    attempt = golden.run("golden", tracker_env(golden.workdir))
    assert attempt.returncode == 0, golden.describe()
    killed = resumed.run(
        "killed", {**tracker_env(resumed.workdir), "APT_TEST_SIGNAL_AT": "SIGKILL@step_start:13"}
    )
    assert killed.returncode == -9, resumed.describe()
    assert killed.last_step == 13 and killed.latest == "step-000000010", resumed.describe()
    finished = resumed.run("resumed", tracker_env(resumed.workdir))
    assert finished.returncode == 0, resumed.describe()
    assert "resumed from" in finished.stderr, resumed.describe()
    return {"golden": golden, "resumed": resumed}


def run_dir(c: Case) -> Path:
    return c.workdir / "runs" / EXPERIMENT


def assert_monotonic(steps: list[int], where: str) -> None:
    assert steps == sorted(set(steps)), f"{where}: steps not strictly increasing: {steps}"


def test_the_resumed_run_logs_what_the_uninterrupted_run_logs(runs: dict[str, Case]) -> None:
    golden = last_losses(run_dir(runs["golden"]))
    assert sorted(golden) == list(range(1, STEPS + 1))
    # metrics.jsonl: the resumed run dropped the lines after its checkpoint and wrote them again
    records = [r for r in metric_records(run_dir(runs["resumed"])) if "train_loss" in r]
    assert_monotonic([r["step"] for r in records], "metrics.jsonl")
    assert {r["step"]: r["train_loss"] for r in records} == golden


def test_tensorboard_drops_the_points_after_the_checkpoint(runs: dict[str, Case]) -> None:
    golden = tensorboard_scalars(run_dir(runs["golden"]) / "tensorboard", "train_loss")
    got = tensorboard_scalars(run_dir(runs["resumed"]) / "tensorboard", "train_loss")
    assert_monotonic([step for step, _ in got], "tensorboard")
    assert [s for s, _ in golden] == list(range(1, STEPS + 1))
    assert [s for s, _ in got] == [s for s, _ in golden]
    assert [v for _, v in got] == pytest.approx([v for _, v in golden], rel=1e-6)  # float32


def test_wandb_continues_the_same_run_with_monotonic_steps(runs: dict[str, Case]) -> None:
    folder = run_dir(runs["resumed"])
    state = json.loads((folder / "monitoring.json").read_text(encoding="utf-8"))
    run_id = state["wandb"]["run_id"]
    history = wandb_history(wandb_records(folder / "wandb", run_id), "train_loss")
    steps = [step for step, _ in history]
    assert_monotonic(steps, "wandb")
    golden = dict(last_losses(run_dir(runs["golden"])))
    assert steps[-1] == STEPS and len(steps) >= STEPS - 3  # at most the killed tail lost
    for step, value in history:
        assert value == pytest.approx(golden[step], rel=1e-12), step
    offline_runs = sorted(p.name for p in (folder / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(
        n.endswith(state["wandb"]["run_id"]) for n in offline_runs
    )


def test_mlflow_continues_the_same_run_with_monotonic_steps(runs: dict[str, Case]) -> None:
    workdir = runs["resumed"].workdir
    state = json.loads((run_dir(runs["resumed"]) / "monitoring.json").read_text("utf-8"))
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    history = mlflow_history(uri, state["mlflow"]["run_id"], "train_loss")
    assert_monotonic([step for step, _ in history], "mlflow")
    golden = last_losses(run_dir(runs["golden"]))
    assert [step for step, _ in history] == list(range(1, STEPS + 1))
    for step, value in history:
        assert value == pytest.approx(golden[step], rel=1e-12), step


def test_the_run_folder_has_the_documented_layout(runs: dict[str, Case]) -> None:
    folder = run_dir(runs["resumed"])
    for name in ("config.yaml", "provenance.json", "metrics.jsonl", "monitoring.json"):
        assert (folder / name).is_file(), name
    for name in ("checkpoints", "final_model", "tensorboard", "wandb"):
        assert (folder / name).is_dir(), name


def test_no_canary_in_any_file_log_or_logged_parameter(runs: dict[str, Case]) -> None:
    for c in runs.values():
        leaks = [
            str(p)
            for p in c.workdir.rglob("*")
            if p.is_file() and p.name != "monitored.yaml" and CANARY.encode() in p.read_bytes()
        ]
        assert not leaks, f"the canary secret was written to {leaks}"
        for attempt in c.attempts:
            assert CANARY not in attempt.stdout + attempt.stderr, attempt.label
    workdir = runs["golden"].workdir
    state = json.loads((run_dir(runs["golden"]) / "monitoring.json").read_text("utf-8"))
    params = mlflow_run(f"sqlite:///{workdir / 'mlflow.db'}", state["mlflow"]["run_id"]).data.params
    assert params, "no hyperparameters were logged to MLflow"
    assert not [k for k, v in params.items() if CANARY in v]
    callbacks = params["callbacks"]  # a list: one parameter holding its JSON
    assert '"api_token": "***"' in callbacks and "https://builder:***@tracker" in callbacks


def test_a_backend_that_fails_does_not_stop_training(tmp_path: Path) -> None:
    c = case(tmp_path / "failing")
    env: dict[str, Any] = {
        **tracker_env(c.workdir),
        # an unreachable server, with credentials in its URI
        "MLFLOW_TRACKING_URI": f"http://builder:{CANARY}@127.0.0.1:9",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
    }
    attempt = c.run("failing", {k: str(v) for k, v in env.items()})
    assert attempt.returncode == 0, c.describe()
    warnings = [line for line in attempt.stderr.splitlines() if "mlflow" in line.lower()]
    assert warnings and "tracking_uri" in attempt.stderr, c.describe()
    assert CANARY not in attempt.stdout + attempt.stderr
    leaks = [
        str(p) for p in run_dir(c).rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()
    ]
    assert not leaks, f"the tracking URI's password was written to {leaks}"
    assert sorted(last_losses(run_dir(c))) == list(range(1, STEPS + 1))
    assert os.path.isdir(run_dir(c) / "tensorboard")
