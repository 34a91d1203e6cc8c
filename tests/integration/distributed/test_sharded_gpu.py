"""Sharded checkpoints on CUDA: FSDP2 DTensors on the GPU, an async save staged through pinned
memory while the next step updates the weights. Skipped without CUDA (CI has none); run on a
GPU machine with ``pytest -m gpu``. The two-GPU NCCL paths are in test_dist_gpu.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_launch import worker_env

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

HERE = Path(__file__).resolve().parent


def test_async_sharded_save_on_gpu_holds_the_state_at_save_time(tmp_path: Path) -> None:
    worker = HERE / "sharded_gpu_worker.py"
    proc = subprocess.run(
        [sys.executable, str(worker), str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        env=worker_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["sharded"] and got["device"].startswith("cuda")
    assert got["step3_changed_every_weight"]  # the writer ran after the weights moved on
    assert got["saved_equals_state_at_save"]
    assert got["loss3_after_load"] == got["loss3"]
