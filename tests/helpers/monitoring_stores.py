"""Read back what each backend wrote, with each store's own reader (no parsing of ours)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

CANARY = "canary-xyz"

#: The config a run logs: a secret-named key and a URI password, both carrying the canary.
HPARAMS: dict[str, Any] = {
    "model": {"num_layers": 2, "hidden_size": 16, "dropout": 0.1, "tied": True},
    "training": {"lr": 3e-4, "optimizer": {"kind": "adamw", "betas": [0.9, 0.95]}},
    "data": {"api_token": CANARY, "source": f"https://u:{CANARY}@host/data"},
    "note": None,
}


def files_with(root: Path, needle: str = CANARY) -> list[str]:
    """Every file below ``root`` whose bytes contain ``needle``."""
    return sorted(
        str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()
    )


# --- TensorBoard: its own EventAccumulator ------------------------------------------------


def tensorboard(log_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def tensorboard_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every point TensorBoard shows for ``tag``, in order."""
    return [(e.step, e.value) for e in tensorboard(log_dir).Scalars(tag)]


def tensorboard_text(log_dir: Path, tag: str = "config/text_summary") -> str:
    """The text summaries of ``tag``, joined."""
    events = tensorboard(log_dir).Tensors(tag)
    return "\n".join(b.decode() for e in events for b in e.tensor_proto.string_val)


# --- W&B: `wandb leet inspect --json`, wandb's reader of its .wandb transaction log --------


def wandb_records(wandb_dir: Path, run_id: str) -> list[list[dict[str, Any]]]:
    """The records of each local run file of ``run_id`` (one per process), oldest first."""
    # Each process writes <wandb_dir>/offline-run-<time>-<id>/; latest-run links to one.
    files = [p for p in wandb_dir.glob(f"*/run-{run_id}.wandb") if not p.parent.is_symlink()]
    runs = []
    for path in files:
        out = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        runs.append([json.loads(line) for line in out.splitlines() if line.strip()])
    return sorted(runs, key=lambda records: _of(records, "run")[0]["run"]["start_time"])


def _of(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r["type"] == kind]


def wandb_history(runs: list[list[dict[str, Any]]], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``key`` over the processes' run files, in the order written."""
    return [
        (r["history"]["step"]["num"], r["history"]["item"][key])
        for records in runs
        for r in _of(records, "history")
        if key in r["history"]["item"]
    ]


def wandb_config(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The config updates of every run file (the run record's and later ones)."""
    updates = []
    for records in runs:
        updates += [r["run"]["config"]["update"] for r in _of(records, "run")]
        updates += [r["config"]["update"] for r in _of(records, "config")]
    return updates


# --- MLflow: MlflowClient ---------------------------------------------------------------


def mlflow_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    history = MlflowClient(uri).get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]


def mlflow_run(uri: str, run_id: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(uri).get_run(run_id)
