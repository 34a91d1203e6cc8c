"""The quickstart profile trains a real model on real text (a shortened run), with every metric
logger on, and leaves the documented run folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file


def test_quickstart_validation_loss_falls_by_at_least_20_percent(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "apt",
            "train",
            "--profile",
            "quickstart",
            "--set",
            "training.max_steps=60",
            "--set",
            "eval.interval=30",
            "--set",
            "eval.max_batches=10",
            "--set",
            "training.checkpoints.save_interval=30",
            "--set",
            "monitoring.loggers=[{kind: tensorboard}, {kind: wandb, mode: offline}, "
            "{kind: mlflow}]",
        ],
        cwd=tmp_path,
        env={
            **os.environ,
            "WANDB_SILENT": "true",
            "WANDB_CONFIG_DIR": str(tmp_path / ".wandb-config"),
            "WANDB_CACHE_DIR": str(tmp_path / ".wandb-cache"),
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"validation loss: ([\d.]+) -> ([\d.]+)", proc.stdout)
    assert match, proc.stdout
    before, after = float(match[1]), float(match[2])
    assert after <= 0.8 * before, (before, after)
    run = tmp_path / "runs" / "quickstart"
    assert f"run folder: {Path('runs') / 'quickstart'}" in proc.stdout
    assert "sample:" in proc.stdout
    weights = load_file(run / "final_model" / "model.safetensors")
    assert weights and all(t.isfinite().all() for t in weights.values())
    for name in ("config.yaml", "provenance.json", "metrics.jsonl", "env.json", "monitoring.json"):
        assert (run / name).is_file(), name
    for name in ("logs/train.log", "plots/loss.png", "plots/lr.png"):
        assert (run / name).is_file(), name
    for name in ("checkpoints", "final_model", "tensorboard", "wandb"):
        assert (run / name).is_dir(), name
    assert (tmp_path / "runs" / "mlflow.db").is_file()  # the default store, shared by the runs
    assert "resumed" not in proc.stderr and "failed" not in proc.stderr, proc.stderr[-3000:]
