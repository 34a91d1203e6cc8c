"""Issue 11: one run per run folder. Real ``python -m apt train`` processes started on the same
folder at once, one after the other, over a stale lock, under torchrun; and the Trainer.

A gate callback (written next to each test's profile) holds a run at step 2 until the test
creates the gate file, so "the other run is still training" never depends on timing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from faults_harness import base_env, committed, debris, verify_files
from tiny_lm import BigramLM

from apt.trainops.artifacts import RunLock, RunLockedError
from apt.trainops.artifacts import run_lock as run_lock_module
from apt.trainops.engine import Callback, Control, RunState, Trainer

pytestmark = pytest.mark.faults

HOST = socket.gethostname()
STEPS = 12
TIMEOUT = 180
GATE = '''
import os, time
from apt.trainops.engine import Callback


class Gate(Callback):
    """Wait at the end of step 2 until the file $APT_TEST_GATE exists (when set)."""

    def on_step_end(self, state, control):
        gate = os.environ.get("APT_TEST_GATE")
        if gate and state.global_step == 2:
            deadline = time.monotonic() + 120
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.02)
'''


def _profile(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gate_cb.py").write_text(GATE, encoding="utf-8")
    path = folder / "locked.yaml"
    path.write_text(
        "extends: cpu/tiny\ncallbacks:\n  - {name: 'gate_cb:Gate'}\n"
        "artifacts: {experiment_name: locked}\n",
        encoding="utf-8",
    )
    return path


def _start(folder: Path, *, gate: bool = True) -> subprocess.Popen[str]:
    env = base_env()
    env["PYTHONPATH"] = os.pathsep.join([str(folder), env["PYTHONPATH"]])
    if gate:
        env["APT_TEST_GATE"] = str(folder / "go")
    sets = (f"training.max_steps={STEPS}", "data.max_corpus_bytes=8000", "eval.max_batches=1")
    return subprocess.Popen(
        [sys.executable, "-m", "apt", "train", "--profile", str(_profile(folder))]
        + [arg for s in sets for arg in ("--set", s)],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_until_training(run_dir: Path, proc: subprocess.Popen[str]) -> None:
    """Until ``proc`` has logged step 1 (it then waits at its gate, at the end of step 2)."""
    deadline = time.monotonic() + TIMEOUT
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and '"step": 1,' in metrics.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"the run never trained: {proc.communicate()}")


def _strict(line: str) -> dict[str, object]:
    def refuse(name: str) -> None:
        raise ValueError(name)

    record: dict[str, object] = json.loads(line, parse_constant=refuse)
    return record


def _assert_one_intact_run(run_dir: Path) -> None:
    """metrics.jsonl holds one run's records (each step once, in order), the newest
    checkpoint is of the last step and verifies, the final model is there, the lock is gone."""
    records = [_strict(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train_loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps
    ckpt_dir = run_dir / "checkpoints"
    assert not debris(ckpt_dir)
    newest = committed(ckpt_dir)[-1]
    assert (ckpt_dir / "LATEST").read_text().strip() == newest.name == f"step-{STEPS:09d}"
    verify_files(newest)
    assert (run_dir / "final_model" / "model.safetensors").is_file()
    assert not (run_dir / ".lock").exists()


@contextmanager
def _held_by_another_process(folder: Path) -> Iterator[int]:
    """A live process holding ``folder``'s lock; yields its pid."""
    code = (
        "import sys\nfrom apt.trainops.artifacts import RunLock\n"
        f"lock = RunLock({str(folder)!r})\nlock.acquire()\nprint('held', flush=True)\n"
        "sys.stdin.read()\nlock.release()\n"
    )
    folder.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", code],
        env=base_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    try:
        yield holder.pid
    finally:
        holder.communicate(timeout=30)


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


# ------------------------------------------------------------------ two CLI processes
def test_the_same_command_twice_at_once_trains_once(tmp_path: Path) -> None:
    first, second = _start(tmp_path), _start(tmp_path)
    run_dir = tmp_path / "runs" / "locked"
    try:
        # One of them holds the folder at step 2 until the gate opens; the other must end.
        deadline = time.monotonic() + TIMEOUT
        while first.poll() is None and second.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        loser, winner = (first, second) if first.poll() is not None else (second, first)
        _, loser_err = loser.communicate(timeout=TIMEOUT)
        assert winner.poll() is None, "both ended: the winner did not wait at its gate"
    finally:
        (tmp_path / "go").touch()
    _, winner_err = winner.communicate(timeout=TIMEOUT)
    assert loser.returncode == 2, loser_err
    assert winner.returncode == 0, winner_err
    assert f"is in use by another run: pid {winner.pid} on host {HOST}" in loser_err
    assert "choose another artifacts.experiment_name" in loser_err
    assert "Traceback" not in loser_err + winner_err
    _assert_one_intact_run(run_dir)


def test_a_second_command_seconds_later_is_refused_and_the_first_is_intact(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "runs" / "locked"
    first = _start(tmp_path)
    try:
        _wait_until_training(run_dir, first)  # past the debris clean of its resume
        holder = json.loads((run_dir / ".lock").read_text())
        assert holder["pid"] == first.pid and holder["host"] == HOST and holder["started"]
        second = _start(tmp_path, gate=False)
        _, err = second.communicate(timeout=TIMEOUT)
        assert first.poll() is None
    finally:
        (tmp_path / "go").touch()
    _, first_err = first.communicate(timeout=TIMEOUT)
    assert second.returncode == 2 and "Traceback" not in err, err
    assert f"pid {first.pid} on host {HOST}, since {holder['started']}" in err
    assert f"kill {first.pid}" in err and str(Path("runs/locked/.lock")) in err
    assert first.returncode == 0, first_err
    _assert_one_intact_run(run_dir)


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "locked"
    run_dir.mkdir(parents=True)
    pid = _dead_pid()
    stale = {"host": HOST, "pid": pid, "started": "2024-01-01T00:00:00+00:00"}
    (run_dir / ".lock").write_text(json.dumps(stale))
    proc = _start(tmp_path, gate=False)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert f"took over the lock of pid {pid} on host {HOST}, since 2024-01-01" in err
    _assert_one_intact_run(run_dir)


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "locked"
    killed = _start(tmp_path)
    _wait_until_training(run_dir, killed)
    killed.kill()
    killed.communicate(timeout=TIMEOUT)
    assert json.loads((run_dir / ".lock").read_text())["pid"] == killed.pid  # left behind
    rerun = _start(tmp_path, gate=False)
    _, err = rerun.communicate(timeout=TIMEOUT)
    assert rerun.returncode == 0, err
    assert f"took over the lock of pid {killed.pid}" in err
    assert not (run_dir / ".lock").exists()


def test_the_forked_children_of_a_killed_holder_do_not_keep_the_lock(tmp_path: Path) -> None:
    """DataLoader workers are forked with the holder's descriptors and outlive a SIGKILL of
    their parent for a moment; the lock must end with the parent."""
    code = (
        "import multiprocessing as mp, os, sys, time\n"
        "from apt.trainops.artifacts import RunLock\n"
        f"lock = RunLock({str(tmp_path)!r})\nlock.acquire()\n"
        "child = mp.get_context('fork').Process(target=time.sleep, args=(60,))\n"
        "child.start()\ntime.sleep(0.5)\nprint(child.pid, flush=True)\nsys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code],
        env=base_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(RunLockedError):
            RunLock(tmp_path).acquire()
        holder.kill()
        holder.wait(timeout=30)
        os.kill(child, 0)  # the forked child still runs
        lock = RunLock(tmp_path)
        lock.acquire()  # ... and does not hold the lock
        lock.release()
    finally:
        holder.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, 9)


@pytest.mark.distributed
def test_under_torchrun_a_held_folder_ends_every_rank_with_exit_2(tmp_path: Path) -> None:
    """Rank 0 cannot take the folder; rank 1 learns it from rank 0 and does not wait."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = ("training.max_steps=2", "data.max_corpus_bytes=8000", "artifacts.experiment_name=d")
    with _held_by_another_process(tmp_path / "runs" / "d") as pid:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "apt", "launch", "--nproc-per-node=2"]
            + [f"--master-port={port}", "train", "--profile", "cpu/ddp_tiny"]
            + [arg for s in sets for arg in ("--set", s)],
            cwd=tmp_path,
            env=base_env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert sorted(p.name for p in (tmp_path / "runs" / "d").iterdir()) == [".lock"]
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - started < 60  # not a collective timeout
    assert f"is in use by another run: pid {pid} on host {HOST}" in proc.stderr
    assert "rank 1: rank 0 stopped the run" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ the Trainer
def _trainer(folder: Path, **kwargs: object) -> Trainer:
    options: dict[str, object] = {
        "batch_size": 4,
        "max_steps": 4,
        "save_interval": 2,
        "output_dir": str(folder / "runs"),
        "experiment_name": "lib",
        **kwargs,
    }
    data = [{"input_ids": (torch.arange(12) + i) % 32} for i in range(32)]
    return Trainer(model=BigramLM(squash=False), train_dataset=data, **options)  # type: ignore[arg-type]


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_a_trainer_on_a_held_folder_touches_nothing(in_tmp: Path) -> None:
    """Refused before the debris of the holder's save in progress is cleaned, before
    metrics.jsonl is opened, before --new-run moves the folder."""
    run_dir = in_tmp / "runs" / "lib"
    (run_dir / "checkpoints" / ".tmp-step-000000007").mkdir(parents=True)
    (run_dir / "checkpoints" / ".tmp-step-000000007" / "model.safetensors").write_bytes(b"x")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train_loss": 2.0}\n')
    with _held_by_another_process(run_dir) as pid:
        before = _files(in_tmp)
        for new_run in (False, True):
            with pytest.raises(RunLockedError) as caught:
                _trainer(in_tmp, new_run=new_run)
            assert caught.value.exit_code == 2 and caught.value.holder["pid"] == pid
            assert f"pid {pid} on host {HOST}" in str(caught.value)
            assert _files(in_tmp) == before
    result = _trainer(in_tmp).train()  # the holder is gone: trains, and cleans the debris
    assert result.global_step == 4
    assert not (run_dir / "checkpoints" / ".tmp-step-000000007").exists()
    assert not (run_dir / ".lock").exists()


def test_an_idle_trainer_of_this_process_hands_the_folder_over(in_tmp: Path) -> None:
    # A notebook cell run twice builds a second Trainer of the folder while the first exists.
    first = _trainer(in_tmp)
    second = _trainer(in_tmp)
    assert second.artifacts.locked and not first.artifacts.locked
    assert second.train().global_step == 4
    assert not (in_tmp / "runs" / "lib" / ".lock").exists()
    assert first.train().global_step == 4  # takes it back: the run is complete already
    assert not (in_tmp / "runs" / "lib" / ".lock").exists()


class BuildAnotherTrainer(Callback):
    """Builds a Trainer of the same folder while this one trains."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.refusals: list[str] = []

    def on_step_end(self, state: RunState, control: Control) -> None:
        if state.global_step == 2:
            try:
                _trainer(self.folder)
            except RunLockedError as exc:
                self.refusals.append(str(exc))


def test_a_trainer_that_trains_keeps_the_folder_from_another_of_this_process(
    in_tmp: Path,
) -> None:
    intruder = BuildAnotherTrainer(in_tmp)
    trainer = _trainer(in_tmp, callbacks=[intruder])
    assert trainer.train().global_step == 4
    assert len(intruder.refusals) == 1
    assert "this process: another Trainer of the same folder is training" in intruder.refusals[0]
    assert not (in_tmp / "runs" / "lib" / ".lock").exists()


class Boom(Callback):
    def on_step_end(self, state: RunState, control: Control) -> None:
        if state.global_step == 3:
            raise RuntimeError("boom at step 3")


def test_the_folder_is_released_when_training_fails(in_tmp: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(in_tmp, callbacks=[Boom()]).train()
    assert not (in_tmp / "runs" / "lib" / ".lock").exists()
    assert _trainer(in_tmp).train().global_step == 4  # resumed from step 2


def test_two_runs_may_not_share_a_checkpoint_folder_outside_their_run_folders(
    in_tmp: Path,
) -> None:
    shared = in_tmp / "shared-ckpt"
    with _held_by_another_process(shared) as pid, pytest.raises(RunLockedError) as caught:
        _trainer(in_tmp, experiment_name="b", checkpoint_dir=str(shared))
    message = str(caught.value)
    assert f"the checkpoint folder {shared} is in use by another run: pid {pid}" in message
    assert "choose another training.checkpoints.directory" in message
    assert not (in_tmp / "runs" / "b" / ".lock").exists()  # the run folder's lock let go too


def test_without_flock_the_pid_decides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock_module.fcntl, "flock", no_flock)
    lock_file = tmp_path / ".lock"
    lock_file.write_text(json.dumps({"host": HOST, "pid": os.getppid(), "started": "t"}))
    with pytest.raises(RunLockedError, match=f"pid {os.getppid()} on host {HOST}"):
        RunLock(tmp_path).acquire()
    lock_file.write_text(json.dumps({"host": HOST, "pid": _dead_pid(), "started": "t"}))
    with caplog.at_level("INFO", logger="apt"):
        lock = RunLock(tmp_path)
        lock.acquire()
    assert "cannot flock" in caplog.text and "took over the lock" in caplog.text
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_file.exists()
