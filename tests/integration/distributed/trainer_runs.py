"""Run the real CLI (``python -m apt train`` / ``python -m apt launch ... train``) for the Trainer
tests, and read what the runs left behind (metrics, checkpoints, exported weights).

Every run of one test session shares a working folder (``cwd``) and writes
``runs/<experiment_name>/`` inside it, as a user's runs would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path

import torch
from dist_launch import free_port, worker_env
from safetensors.torch import load_file

from apt.trainops.checkpoints.dcp import read_dcp_tensors

HERE = Path(__file__).resolve().parent
RUN_TIMEOUT_S = 120  # one CLI run; the longest takes ~10 s on 2 cores

# The run every test trains: cpu/tiny (2 blocks, width 32, seq 32, constant lr 3e-3, AdamW) on
# 3.5 kB of the standard library = 109 training sequences, an odd count, so the sampler's
# drop_last differs between 1 and 2 ranks if it is going to. 13 steps of 8 sequences per epoch:
# 20 steps cross an epoch boundary, and so do the resume chains. Checkpoints every 5 steps.
BASE = (
    "training.deterministic=true",
    "training.max_steps=20",
    "training.checkpoints.save_interval=5",
    "training.checkpoints.keep_last_n=3",
    "training.distributed.timeout_seconds=60",
    "data.max_corpus_bytes=3500",
    "eval.interval=10",
    "eval.max_batches=2",
    "monitoring.log_interval=1",
    "artifacts.output_dir=runs",
)
GLOBAL_BATCH = 8
FAULT_HOOK = "callbacks=[{name: trainer_hooks:FaultHook}]"

# What every model-parallel strategy (tensor, sequence, pipeline, hybrid) must match one
# process by over TEN_STEPS, fp32 on gloo, the same samples per step. Only the order of sums
# differs (each test file says which sums and what it measured: at most 4.6e-7 for a loss or
# a first-step gradient), so 1e-5 leaves a >= 20x margin and still fails on any real error
# (those move the loss by > 1e-3 at once). Weights after 10 Adam steps drift further (measured
# up to 5.0e-6): Adam turns round-off-sized gradient differences into O(lr) updates (see
# test_trainer_distributed.py). Hence 1e-4.
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5
WEIGHT_RTOL = 1e-4
TEN_STEPS = "training.max_steps=10"


def tiny_train_size() -> int:
    """Sequences in the training split of the BASE run (what every rank's sampler shares)."""
    from apt import load_profile
    from apt.trainops.engine.tasks import build_task

    cfg = load_profile("cpu/tiny", overrides=list(BASE))
    train_set, _ = build_task(cfg.training.task).build_datasets(cfg.data, seed=cfg.training.seed)
    assert isinstance(train_set, Sized)
    return len(train_set)


def loaded_weights_hook(path: Path) -> str:
    """The ``--set`` that installs :class:`trainer_hooks.LoadedWeights` writing to ``path``."""
    return f"callbacks=[{{name: trainer_hooks:LoadedWeights, path: '{path}'}}]"


def cli_env(**extra: str) -> dict[str, str]:
    """Environment of a CLI run: one thread per process, this folder importable (callbacks)."""
    env = worker_env()
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env["PYTHONPATH"]])
    for key in ("APT_TEST_FAULT", "APT_TEST_FAULT_MARKER", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    env.update(extra)
    return env


def train_args(name: str, profile: str, *overrides: str) -> list[str]:
    """``train --profile P --set ...`` for the run ``runs/<name>``."""
    sets = [*BASE, f"artifacts.experiment_name={name}", *overrides]
    return ["train", "--profile", profile, *(arg for s in sets for arg in ("--set", s))]


def single_cmd(name: str, *overrides: str, flags: tuple[str, ...] = ()) -> list[str]:
    """One process, the global batch in one micro-batch."""
    args = train_args(name, "cpu/tiny", f"training.batch_size={GLOBAL_BATCH}", *overrides)
    return [sys.executable, "-m", "apt", *args, *flags]


def strategy_cmd(
    name: str, strategy: str, *overrides: str, nproc: int = 2, batch_size: int = GLOBAL_BATCH
) -> list[str]:
    """``python -m apt launch`` of ``nproc`` gloo ranks training cpu/tiny under ``strategy``,
    ``batch_size`` sequences a micro-batch on each rank."""
    args = train_args(
        name,
        "cpu/tiny",
        f"training.batch_size={batch_size}",
        f"training.distributed.strategy={strategy}",
        "training.distributed.backend=gloo",
        *overrides,
    )
    return [sys.executable, "-m", "apt", "launch", f"--nproc-per-node={nproc}",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", *args]  # fmt: skip


def crash_then_rerun(cmd: list[str], cwd: Path, *, fault: str, copy_to: str) -> dict:
    """Run ``cmd`` (which trains ``runs/killed``, with :data:`FAULT_HOOK`) armed with
    ``APT_TEST_FAULT=fault``, copy the folder the crash left to ``runs/<copy_to>`` (for a
    resume under another layout), then run the same command again.

    Returns:
        ``{"crashed": Finished, "latest": LATEST after the crash, "rerun": Finished}``.
    """
    crashed = run(cmd, cwd, APT_TEST_FAULT=fault)
    run_dir = cwd / "runs" / "killed"
    latest_after_crash = latest(run_dir)
    shutil.copytree(run_dir, cwd / "runs" / copy_to)
    rerun = run(cmd, cwd).check()
    return {"crashed": crashed, "latest": latest_after_crash, "rerun": rerun}


def train_one_process_run(work: Path) -> None:
    """The one-process run of TEN_STEPS the strategies are compared with: ``runs/single`` and
    its first-step gradients (``single-grads.rank0.safetensors``) in ``work``."""
    run(single_cmd("single", TEN_STEPS, first_gradients_hook(work / "single-grads")), work).check()


def copy_one_process_run(source: Path, work: Path) -> None:
    """Put the one-process run trained in ``source`` into ``work``, as if trained there."""
    shutil.copytree(source / "runs" / "single", work / "runs" / "single")
    for grads in source.glob("single-grads.*"):
        shutil.copy2(grads, work / grads.name)


def one_process_checkpoint(work: Path, name: str) -> Path:
    """``runs/<name>``: a copy of ``runs/single`` whose newest checkpoint is step 5's (the
    later one and the final model removed), for a run under another layout to resume from;
    its path."""
    run_dir = work / "runs" / name
    shutil.copytree(work / "runs" / "single", run_dir)
    shutil.rmtree(checkpoint_dir(run_dir, 10))
    shutil.rmtree(run_dir / "final_model")
    (run_dir / "checkpoints" / "LATEST").write_text(checkpoint_dir(run_dir, 5).name + "\n")
    return run_dir


def check_trained_on_as_one_process(done: Finished, run_dir: Path, work: Path) -> None:
    """``done`` resumed ``run_dir`` from step 5 and trained on to step 10 as ``runs/single``
    did: losses (steps 1-5 logged before the copy) and final weights within tolerance."""
    assert "resumed from" in done.output and "step 5)" in done.output, done.output[-3000:]
    assert "from step 5 to step 10" in done.output, done.output[-3000:]
    got = train_losses(run_dir)
    assert sorted(got) == list(range(1, 11))
    diffs = loss_rel_diffs(got, train_losses(work / "runs" / "single"))
    assert max(diffs.values()) < LOSS_RTOL, diffs
    weights = max_rel_diff(final_weights(run_dir), final_weights(work / "runs" / "single"))
    assert weights < WEIGHT_RTOL, weights


def check_rerun_ends_as(killed: dict, work: Path, reference: str) -> None:
    """The run :func:`crash_then_rerun` crashed after step 7 (LATEST: step 5) and ran again
    resumed from step 5 and ended bitwise where the uninterrupted ``runs/<reference>`` did,
    losses and weights."""
    assert killed["crashed"].returncode != 0
    assert killed["latest"] == "step-000000005"
    assert "resumed from" in killed["rerun"].output and "step 5)" in killed["rerun"].output
    run_dir, ref_dir = work / "runs" / "killed", work / "runs" / reference
    got, ref = final_weights(run_dir), final_weights(ref_dir)
    assert bitwise_equal(got, ref), max_rel_diff(got, ref)
    assert train_losses(run_dir) == train_losses(ref_dir)  # exactly


def first_gradients_hook(stem: Path) -> str:
    """The ``--set`` that installs :class:`tp_hooks.FirstGradients` writing ``stem``.rank<r>."""
    return f"callbacks=[{{name: tp_hooks:FirstGradients, path: '{stem}'}}]"


def first_gradients(stem: Path, rank: int) -> dict[str, torch.Tensor]:
    """What :class:`tp_hooks.FirstGradients` wrote for ``rank``: every parameter's whole
    gradient after the run's first backward."""
    return load_file(str(stem.parent / f"{stem.name}.rank{rank}.safetensors"))


def launch_cmd(
    name: str,
    strategy: str,
    *overrides: str,
    port: int | None = None,
    nnodes: int = 1,
    node_rank: int = 0,
    flags: tuple[str, ...] = (),
    launch_flags: tuple[str, ...] = (),
) -> list[str]:
    """``python -m apt launch`` of 2 ranks in all (``nnodes`` x ``2 // nnodes``), half the
    global batch each."""
    profile = {"ddp": "cpu/ddp_tiny", "fsdp": "cpu/fsdp_tiny"}[strategy]
    args = train_args(name, profile, f"training.batch_size={GLOBAL_BATCH // 2}", *overrides)
    return [
        sys.executable,
        "-m",
        "apt",
        "launch",
        f"--nnodes={nnodes}",
        f"--node-rank={node_rank}",
        f"--nproc-per-node={2 // nnodes}",
        "--master-addr=127.0.0.1",
        f"--master-port={port or free_port()}",
        *launch_flags,
        *args,
        *flags,
    ]


@dataclass
class Finished:
    """A CLI run that ended: exit code, output, and how long it took."""

    cmd: list[str]
    returncode: int
    output: str
    seconds: float

    def check(self) -> Finished:
        assert self.returncode == 0, (
            f"{' '.join(self.cmd)}\nexit {self.returncode}:\n" + (self.output[-6000:])
        )
        return self


def start(cmd: list[str], cwd: Path, **env: str) -> subprocess.Popen[str]:
    """Start a CLI run in its own session (so the test can kill its process group)."""
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=cli_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen[str], started: float, timeout: float = RUN_TIMEOUT_S) -> Finished:
    """Wait for ``proc``; kill its whole tree if it overstays ``timeout``."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate(timeout=30)
        out += f"\n[test] killed after {timeout:.0f}s"
    cmd = [str(a) for a in proc.args]  # type: ignore[union-attr]
    return Finished(cmd, proc.returncode, out, time.monotonic() - started)


def run(cmd: list[str], cwd: Path, timeout: float = RUN_TIMEOUT_S, **env: str) -> Finished:
    """Run a CLI command to its end."""
    started = time.monotonic()
    return finish(start(cmd, cwd, **env), started, timeout)


# ----------------------------------------------------------------------------- processes
def children(pid: int) -> list[int]:
    """Direct children of ``pid``, from the parent field of every ``/proc/<pid>/stat`` (Linux;
    ``/proc/<pid>/task/*/children`` needs a kernel option that not every kernel has)."""
    out: list[int] = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return sorted(out)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents first."""
    found: list[int] = []
    todo = children(pid)
    while todo:
        child = todo.pop(0)
        found.append(child)
        todo += children(child)
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s process group and every process below it (torchrun puts each worker
    in a session of its own, so the launcher's group alone does not reach them)."""
    below = descendants(pid)
    for target in [pid, *below]:
        with contextlib.suppress(OSError):  # not a group leader, or gone already
            os.killpg(target, signal.SIGKILL)
        with contextlib.suppress(OSError):  # gone already
            os.kill(target, signal.SIGKILL)


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float) -> None:
    """Wait until ``path`` exists; fail early when ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(
                f"run ended (exit {proc.returncode}) before {path}:\n{out[-4000:]}"
            )
        if time.monotonic() > deadline:
            kill_tree(proc.pid)
            raise AssertionError(f"{path} did not appear within {timeout:.0f}s")
        time.sleep(0.05)


# ----------------------------------------------------------------------------- run folders
def train_losses(run_dir: Path) -> dict[int, float]:
    """``{step: train_loss}`` from metrics.jsonl (a step logged twice, after a crash and a
    resume, keeps its last value)."""
    return {int(r["step"]): float(r["train_loss"]) for r in records(run_dir) if "train_loss" in r}


def records(run_dir: Path) -> list[dict]:
    """Every line of metrics.jsonl."""
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def val_losses(run_dir: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["val_loss"]) for r in records(run_dir) if "val_loss" in r}


def logged_steps(run_dir: Path) -> list[int]:
    """Every step that logged a train_loss, in file order (repeats kept)."""
    return [int(r["step"]) for r in records(run_dir) if "train_loss" in r]


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_weights(run_dir / "final_model" / "model.safetensors")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:09d}"


def checkpoint_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint, gathered (safetensors) or sharded (DCP) alike."""
    folder = checkpoint_dir(run_dir, step) / "model"
    if (folder / ".metadata").is_file():
        return read_dcp_tensors(folder)
    return read_weights(folder / "model.safetensors")


def checkpoint_files(run_dir: Path, step: int) -> set[str]:
    """The files a checkpoint's manifest lists."""
    manifest = json.loads((checkpoint_dir(run_dir, step) / "MANIFEST.json").read_text())
    return set(manifest["files"])


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "LATEST").read_text().strip()


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of |a - b| / |b| (Frobenius norms)."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in a)


def loss_rel_diffs(got: dict[int, float], ref: dict[int, float]) -> dict[int, float]:
    """Per-step relative loss difference; the steps must be the same."""
    assert sorted(got) == sorted(ref), (sorted(got), sorted(ref))
    return {s: abs(got[s] - ref[s]) / abs(ref[s]) for s in ref}


__all__ = [
    "BASE",
    "FAULT_HOOK",
    "GLOBAL_BATCH",
    "Finished",
    "alive",
    "bitwise_equal",
    "checkpoint_weights",
    "cli_env",
    "descendants",
    "final_weights",
    "finish",
    "free_port",
    "kill_tree",
    "latest",
    "launch_cmd",
    "loaded_weights_hook",
    "logged_steps",
    "loss_rel_diffs",
    "max_rel_diff",
    "read_weights",
    "records",
    "run",
    "single_cmd",
    "start",
    "tiny_train_size",
    "train_losses",
    "val_losses",
    "wait_for",
]
