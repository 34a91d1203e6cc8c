"""Ctrl-C and SIGTERM as users deliver them: through a pipe whose reader dies, to a process
group with DataLoader workers, twice in a row. Real ``python -m apt train`` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from faults_harness import base_env

pytestmark = pytest.mark.faults

HERE = Path(__file__).resolve().parent
# A run long enough to be interrupted, saving every 5 steps.
RUN = (
    "--set", "training.max_steps=100000",
    "--set", "training.checkpoints.save_interval=5",
    "--set", "data.max_corpus_bytes=20000",
    "--set", "eval.interval=1000",
    "--set", "artifacts.experiment_name=interrupted",
)  # fmt: skip


def _profile(folder: Path) -> Path:
    path = folder / "interrupt.yaml"
    path.write_text(
        "extends: cpu/tiny\ncallbacks:\n  - {name: 'faults_inject:SignalAt'}\n", encoding="utf-8"
    )
    return path


def _start(folder: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "apt", "train", "--profile", str(_profile(folder)), *RUN, *extra],
        cwd=folder,
        env={**base_env(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's job
    )


def _latest(folder: Path) -> str:
    return (folder / "runs/interrupted/checkpoints/LATEST").read_text().strip()


def test_ctrl_c_through_a_dead_pipe_still_saves_and_exits_130(tmp_path: Path) -> None:
    """``train ... 2>&1 | tee log`` and Ctrl-C: tee dies with the group, then every write of
    the run fails; the exit save must still happen."""
    proc = _start(tmp_path, "--set", "monitoring.progress_bar=true")
    assert proc.stdout is not None
    for line in proc.stdout:  # what tee shows until it dies
        if "checkpoint step-000000005 saved" in line:
            break
    proc.stdout.close()  # the reader is gone: the next write gets EPIPE
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    step = int(_latest(tmp_path).removeprefix("step-"))
    assert step > 5, "the exit save is missing: LATEST still names the interval save"


def test_one_message_per_ctrl_c_with_dataloader_workers(tmp_path: Path) -> None:
    proc = _start(
        tmp_path,
        "--set", "data.num_workers=2",
        env={"APT_TEST_SIGNAL_AT": "SIGINT@batch_end:6", "APT_TEST_SIGNAL_GROUP": "1"},
    )  # fmt: skip
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGINT, out
    assert out.count("received SIGINT") == 1, out
    assert "Traceback" not in out, out
    assert _latest(tmp_path) == "step-000000007"


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path: Path) -> None:
    proc = _start(
        tmp_path,
        "--set", "data.num_workers=2",
        env={"APT_TEST_SIGNAL_AT": "SIGINTx2@batch_end:7", "APT_TEST_SIGNAL_GROUP": "1"},
    )  # fmt: skip
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGINT, out
    assert "stopped at once, without saving" in out and "Traceback" not in out, out
    assert _latest(tmp_path) == "step-000000005"  # the interval save before; nothing newer
