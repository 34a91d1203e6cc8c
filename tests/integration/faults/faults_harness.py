"""Run, kill, corrupt and compare real ``python -m apt train`` runs (the fault suite's tools).

A :class:`Case` is one working directory and the one command every attempt in it runs
(``python -m apt train --profile <faults.yaml> --set ...``); attempts differ only by their
environment (``APT_FAULT_INJECT``, ``APT_TEST_SIGNAL_AT``). :func:`assert_like_golden` checks a
finished case against the uninterrupted golden run of the same config:

(a) the last logged ``train_loss`` of every step equals the golden value exactly;
(b) every tensor of ``final_model/model.safetensors`` is bitwise equal;
(c) no attempt printed a traceback;
(d) no ``.tmp-*`` debris is left in ``checkpoints/``;
(e) ``LATEST`` names the newest committed checkpoint, of the final step, and it verifies
    (sizes and sha256 recomputed here, independently of APT's own verification).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
SHIPPED_PROFILE = REPO / "apt" / "profiles" / "cpu" / "faults_tiny.yaml"
EXPERIMENT = "faults_tiny"
SIGNAL_ENV = "APT_TEST_SIGNAL_AT"
FAULT_ENV = "APT_FAULT_INJECT"
ATTEMPT_TIMEOUT = 120.0


def write_profile(folder: Path) -> Path:
    """The suite's profile: the shipped ``cpu/faults_tiny`` plus the :mod:`faults_inject`
    callback (inert unless ``APT_TEST_SIGNAL_AT`` is set), so golden and faulted runs share
    one config."""
    path = folder / "faults.yaml"
    path.write_text(
        f"extends: {SHIPPED_PROFILE}\ncallbacks:\n  - {{name: 'faults_inject:SignalAt'}}\n",
        encoding="utf-8",
    )
    return path


def base_env() -> dict[str, str]:
    """The subprocess environment: no stray fault variables, this folder importable, and one
    intra-op thread (identical reductions in every run, and no oversubscription of 2 cores)."""
    env = {k: v for k, v in os.environ.items() if k not in (SIGNAL_ENV, FAULT_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH", "")]))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@dataclass(frozen=True)
class Attempt:
    """One finished process of a case, and what it left behind.

    Attributes:
        last_step: the highest step ``metrics.jsonl`` held when the process ended.
        latest: what ``checkpoints/LATEST`` named then (None: no LATEST).
        entries: the names in ``checkpoints/`` then, LATEST left out.
    """

    label: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    last_step: int | None = None
    latest: str | None = None
    entries: tuple[str, ...] = ()

    def describe(self) -> str:
        tail = "\n".join(self.stderr.splitlines()[-15:])
        return f"[{self.label}] exit {self.returncode} after {self.seconds:.1f} s\n{tail}"


@dataclass
class Case:
    """A working directory and the command every attempt in it runs."""

    workdir: Path
    profile: Path
    overrides: tuple[str, ...] = ()
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.workdir / "runs" / EXPERIMENT

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def command(self) -> list[str]:
        sets = [arg for o in self.overrides for arg in ("--set", o)]
        return [sys.executable, "-m", "apt", "train", "--profile", str(self.profile), *sets]

    def start(self, label: str, env: dict[str, str] | None = None) -> _Running:
        """Start an attempt with ``env`` added to :func:`base_env` (stdout and stderr go to
        files, so a killed process, or its orphaned DataLoader workers, never block a pipe)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        n = len(self.attempts)
        out = open(self.workdir / f"attempt-{n}.out", "w+", encoding="utf-8")  # noqa: SIM115
        err = open(self.workdir / f"attempt-{n}.err", "w+", encoding="utf-8")  # noqa: SIM115
        proc = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            env={**base_env(), **(env or {})},
            stdout=out,
            stderr=err,
            text=True,
        )
        return _Running(self, label, proc, out, err, time.perf_counter())

    def run(self, label: str, env: dict[str, str] | None = None) -> Attempt:
        """Run one attempt to its end."""
        return self.start(label, env).wait()

    def copy_to(self, workdir: Path) -> Case:
        """A new case whose folder starts as a copy of this one's (attempt history not kept)."""
        shutil.copytree(self.workdir / "runs", workdir / "runs")
        return Case(workdir, self.profile, self.overrides)

    def describe(self) -> str:
        return "\n".join(a.describe() for a in self.attempts)


@dataclass
class _Running:
    case: Case
    label: str
    proc: subprocess.Popen[str]
    out: Any
    err: Any
    started: float

    def wait(self, timeout: float = ATTEMPT_TIMEOUT) -> Attempt:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        seconds = time.perf_counter() - self.started
        self.out.seek(0)
        self.err.seek(0)
        ckpt_dir = self.case.ckpt_dir
        attempt = Attempt(
            self.label,
            self.proc.returncode,
            self.out.read(),
            self.err.read(),
            seconds,
            last_step=max(last_losses(self.case.run_dir, strict=False), default=None),
            latest=latest_name(ckpt_dir) if (ckpt_dir / "LATEST").exists() else None,
            entries=tuple(sorted(p.name for p in ckpt_dir.glob("*") if p.name != "LATEST")),
        )
        self.out.close()
        self.err.close()
        self.case.attempts.append(attempt)
        return attempt

    def kill_after_first_step(self, delay: float) -> Attempt:
        """SIGKILL ``delay`` seconds after this attempt logs its first training step (if it
        is still running then) and return the attempt."""
        metrics = self.case.run_dir / "metrics.jsonl"
        already = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        deadline = time.monotonic() + ATTEMPT_TIMEOUT
        while self.proc.poll() is None and time.monotonic() < deadline:
            lines = metrics.read_text().splitlines()[already:] if metrics.exists() else []
            if any('"train_loss"' in line for line in lines):
                break
            time.sleep(0.002)
        time.sleep(delay)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.wait()


# ----------------------------------------------------------------------------------- reading
def metric_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every line of ``metrics.jsonl``; a torn or non-JSON line fails the test."""
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            message = f"metrics.jsonl line {number} is not JSON ({exc}): {line!r}"
            raise AssertionError(message) from None
    return records


def last_losses(run_dir: Path, *, strict: bool = True) -> dict[int, float]:
    """``{step: train_loss}`` keeping the last value logged for each step."""
    if not strict and not (run_dir / "metrics.jsonl").exists():
        return {}
    return {r["step"]: r["train_loss"] for r in metric_records(run_dir) if "train_loss" in r}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``final_model/model.safetensors`` (a missing file fails the test)."""
    path = run_dir / "final_model" / "model.safetensors"
    assert path.is_file(), f"{path} is missing: the finished run exported no final model"
    return load_file(str(path))


def training_window(run_dir: Path) -> float:
    """Seconds between the first and the last logged training step of a run."""
    times = [r["time"] for r in metric_records(run_dir) if "train_loss" in r]
    return max(times) - min(times)


def manifest(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "MANIFEST.json").read_text(encoding="utf-8"))


def committed(ckpt_dir: Path) -> list[Path]:
    """``step-*`` folders holding a parseable manifest, oldest commit first."""
    found = []
    for path in ckpt_dir.glob("step-*"):
        try:
            found.append((manifest(path)["sequence"], path))
        except (OSError, ValueError, KeyError):
            continue
    return [p for _, p in sorted(found)]


def verify_files(ckpt: Path) -> None:
    """Recompute the size and sha256 of every file the manifest lists."""
    listed = manifest(ckpt)["files"]
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {
        "MANIFEST.json"
    }
    assert set(listed) == on_disk, f"{ckpt}: manifest lists {sorted(listed)}, disk {on_disk}"
    for rel, want in listed.items():
        data = (ckpt / rel).read_bytes()
        assert len(data) == want["size"], f"{ckpt / rel}: size {len(data)} != {want['size']}"
        assert hashlib.sha256(data).hexdigest() == want["sha256"], f"{ckpt / rel}: sha256"


def debris(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith(".tmp-"))


# ----------------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Golden:
    """An uninterrupted run: what every faulted run of the same config must reproduce."""

    case: Case
    losses: dict[int, float]
    weights: dict[str, torch.Tensor]
    window: float

    @property
    def final_step(self) -> int:
        return max(self.losses)


def run_golden(case: Case) -> Golden:
    """Run ``case`` once, uninterrupted, and record what the faulted runs must reproduce."""
    attempt = case.run("golden")
    assert attempt.returncode == 0, case.describe()
    assert "Traceback" not in attempt.stderr, case.describe()
    return Golden(
        case,
        last_losses(case.run_dir),
        final_weights(case.run_dir),
        training_window(case.run_dir),
    )


def assert_losses_equal(case: Case, golden: Golden) -> None:
    """(a) The last logged train_loss of every step is the golden one, exactly."""
    got = last_losses(case.run_dir)
    missing = sorted(set(golden.losses) - set(got))
    extra = sorted(set(got) - set(golden.losses))
    assert not missing and not extra, f"steps missing {missing}, unexpected {extra}"
    differ = [s for s in sorted(got) if got[s] != golden.losses[s]]
    assert not differ, (
        f"train_loss differs from the golden run at steps {differ}; first: step {differ[0]}: "
        f"{got[differ[0]]!r} != {golden.losses[differ[0]]!r}\n{case.describe()}"
    )


def assert_weights_equal(case: Case, golden: Golden) -> None:
    """(b) Every tensor of the exported final model is bitwise equal to the golden one."""
    got = final_weights(case.run_dir)
    assert sorted(got) == sorted(golden.weights), "final_model tensor names differ"
    differ = [name for name in got if not torch.equal(got[name], golden.weights[name])]
    assert not differ, f"final weights differ from the golden run: {differ}\n{case.describe()}"


def assert_no_traceback(case: Case) -> None:
    """(c) A handled fault never shows the user a traceback."""
    for attempt in case.attempts:
        assert "Traceback" not in attempt.stderr, attempt.describe()


def assert_checkpoints_clean(case: Case, final_step: int) -> None:
    """(d) no ``.tmp-*`` debris; (e) LATEST names the newest commit, of ``final_step``, intact."""
    ckpt_dir = case.ckpt_dir
    assert not debris(ckpt_dir), f"debris left in {ckpt_dir}: {debris(ckpt_dir)}"
    latest = (ckpt_dir / "LATEST").read_text(encoding="utf-8").strip()
    newest = committed(ckpt_dir)[-1]
    assert latest == newest.name, f"LATEST names {latest}, the newest commit is {newest.name}"
    assert manifest(newest)["step"] == final_step, f"{newest.name} is not step {final_step}"
    verify_files(newest)


def assert_like_golden(case: Case, golden: Golden) -> None:
    """All of (a)-(e) for a case whose last attempt finished the run."""
    assert case.attempts and case.attempts[-1].returncode == 0, case.describe()
    assert_losses_equal(case, golden)
    assert_weights_equal(case, golden)
    assert_no_traceback(case)
    assert_checkpoints_clean(case, golden.final_step)


def killed_by(attempt: Attempt, sig: signal.Signals) -> bool:
    """The process ended by ``sig`` itself (SIGKILL) or exited with 128 + signum."""
    return attempt.returncode in (-int(sig), 128 + int(sig))


# ----------------------------------------------------------------------------------- output
_RESUMED = re.compile(r"resumed from \S*step-(\d+) \(epoch (\d+), step (\d+)\)")


def resumed_from(attempt: Attempt) -> tuple[int, int] | None:
    """(epoch, step) an attempt says it resumed from, or None."""
    match = _RESUMED.search(attempt.stderr)
    return (int(match.group(2)), int(match.group(3))) if match else None


def latest_name(ckpt_dir: Path) -> str:
    return (ckpt_dir / "LATEST").read_text(encoding="utf-8").strip()


def step_name(step: int) -> str:
    return f"step-{step:09d}"
