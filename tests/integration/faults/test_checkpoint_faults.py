"""Faults inside the checkpoint system: kills at each commit point, corrupt files, a full disk.

Fault points come from ``APT_FAULT_INJECT`` (``apt/trainops/checkpoints/faults.py``). Each case
ends with the same command run to completion and is checked against the golden run
(``assert_like_golden``: losses and weights bitwise, no traceback, no debris, LATEST intact).
"""

from __future__ import annotations

import json
import shutil
import signal

import pytest
from faults_harness import (
    FAULT_ENV,
    Case,
    Golden,
    assert_checkpoints_clean,
    assert_like_golden,
    assert_losses_equal,
    assert_no_traceback,
    assert_weights_equal,
    committed,
    debris,
    killed_by,
    metric_records,
    resumed_from,
    step_name,
)
from faults_scenarios import Context, scenario

pytestmark = pytest.mark.faults

ASYNC = "training.checkpoints.async_save=true"
CONTINUE = "training.checkpoints.on_save_error=continue"
COMMIT_POINTS = ("kill_before_manifest@15", "kill_before_rename@20", "kill_before_latest@25")


def steps(*numbers: int) -> tuple[str, ...]:
    return tuple(step_name(n) for n in numbers)


# --------------------------------------------------------------------- scenarios
@scenario("commit-points", runs=4)
def _commit_points(ctx: Context) -> Case:
    case = ctx.case()
    for point in COMMIT_POINTS:  # each attempt resumes from what the previous one left
        case.run(point, env={FAULT_ENV: point})
        if point.startswith("kill_before_rename"):
            stage = case.ckpt_dir / ".tmp-step-000000020"
            assert (stage / "MANIFEST.json").is_file(), "the kill came before the manifest"
    case.run("resume")
    return case


@scenario("async-writer-kill", runs=2)
def _async_writer_kill(ctx: Context) -> Case:
    case = ctx.case(ASYNC)
    case.run("killed", env={FAULT_ENV: "kill_in_async_write@15"})
    case.run("resume")
    return case


@scenario("corrupt", runs=1)
def _corrupt(ctx: Context) -> Case:
    """The finished golden run with its three newest checkpoints damaged: a truncated file in
    step 44, a flipped bit in step 40, a garbage manifest in step 35; the same command again."""
    case = ctx.copy_of_golden()
    ckpts = {int(p.name.split("-")[1]): p for p in committed(case.ckpt_dir)}
    assert sorted(ckpts) == [30, 35, 40, 44], sorted(ckpts)
    model = ckpts[44] / "model" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-1000])
    optim = ckpts[40] / "optim" / "optimizer.safetensors"
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0x10
    optim.write_bytes(bytes(data))
    (ckpts[35] / "MANIFEST.json").write_bytes(b'{"format": "apt-checkpoint", \x00\xff garbage')
    # Forget what the golden run did after step 30, so the rerun has to produce it again.
    shutil.rmtree(case.run_dir / "final_model")
    kept = [r for r in metric_records(case.run_dir) if r["step"] <= 30]
    (case.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    case.run("resume")
    return case


@scenario("disk-full-stop", runs=2)
def _disk_full_stop(ctx: Context) -> Case:
    case = ctx.case()
    case.run("disk full at save 15", env={FAULT_ENV: "enospc_on_write@15"})
    case.run("resume")
    return case


def _disk_full_continue(overrides: tuple[str, ...], ctx: Context) -> Case:
    case = ctx.case(*overrides)
    case.run("disk full at saves 15, 44", env={FAULT_ENV: "enospc_on_write@15,enospc_on_write@44"})
    return case


scenario("disk-full-continue-sync", runs=1)(lambda ctx: _disk_full_continue((CONTINUE,), ctx))
scenario("disk-full-continue-async", runs=1)(
    lambda ctx: _disk_full_continue((CONTINUE, ASYNC), ctx)
)


# --------------------------------------------------------------------- checks
@pytest.mark.scenario("commit-points")
def test_sigkill_at_each_commit_point_in_turn(result: Case, golden: Golden) -> None:
    """Three attempts killed at three successive saves, each resuming from what the previous
    left: before the manifest (save 15), between the manifest and the rename (save 20),
    between the rename and the LATEST update (save 25); then a fourth runs to the end."""
    expected = [
        # resumed from, LATEST after the kill, checkpoints/ after the kill
        (None, 10, (".tmp-step-000000015", *steps(5, 10))),
        ((0, 10), 15, (".tmp-step-000000020", *steps(5, 10, 15))),
        ((0, 15), 20, steps(5, 10, 15, 20, 25)),
    ]
    for attempt, (resumed, latest, entries) in zip(result.attempts, expected, strict=False):
        assert killed_by(attempt, signal.SIGKILL), attempt.describe()
        assert resumed_from(attempt) == resumed, attempt.describe()
        # Nothing partial is advertised; the stage of the previous kill is gone.
        assert attempt.latest == step_name(latest), attempt.label
        assert attempt.entries == entries, attempt.label
    # Step 25 is committed but LATEST was not moved to it: the newest commit still wins.
    assert resumed_from(result.attempts[-1]) == (1, 25)
    assert_like_golden(result, golden)


@pytest.mark.scenario("async-writer-kill")
def test_sigkill_inside_the_async_writer(result: Case, golden: Golden) -> None:
    killed, resumed = result.attempts
    assert killed_by(killed, signal.SIGKILL), result.describe()
    assert killed.latest == step_name(10)
    assert killed.entries == (".tmp-step-000000015", *steps(5, 10))
    assert resumed_from(resumed) == (0, 10)  # itself written by the async writer
    assert_like_golden(result, golden)


@pytest.mark.scenario("corrupt")
def test_corrupt_checkpoints_fall_back_to_the_newest_good_one(result: Case, golden: Golden) -> None:
    """Each bad checkpoint is named with its fault, moved aside, and the run falls back to step
    30 and finishes bitwise equal."""
    resumed = result.attempts[-1]
    assert resumed.returncode == 0, result.describe()
    warnings = [line for line in resumed.stderr.splitlines() if "IS CORRUPT" in line]
    for step, fault in (
        (44, "model/model.safetensors: expected size"),
        (40, "optim/optimizer.safetensors: expected sha256"),
        (35, "MANIFEST.json: unreadable or not valid JSON"),
    ):
        line = next((w for w in warnings if step_name(step) + " IS CORRUPT" in w), "")
        assert fault in line and f"Falling back to {step_name(30)}" in line, (step, warnings)
        assert f".corrupt-{step_name(step)}" in resumed.entries, f"step {step} was not kept"
    assert resumed_from(resumed) == (1, 30)
    assert_like_golden(result, golden)


@pytest.mark.scenario("disk-full-stop")
def test_disk_full_with_on_save_error_stop(result: Case, golden: Golden) -> None:
    full, resumed = result.attempts
    assert full.returncode == 1, result.describe()
    assert "disk full while saving the checkpoint of step 15" in full.stderr, full.stderr
    assert "on_save_error: stop" in full.stderr, full.stderr
    assert "Traceback" not in full.stderr
    assert full.last_step == 15, "the run did not stop at the failed save"
    assert full.latest == step_name(10)
    assert full.entries == steps(5, 10), "the partial save was not removed"
    assert resumed_from(resumed) == (0, 10)
    assert_like_golden(result, golden)


def _saved_steps(stderr: str) -> list[int]:
    return [
        int(line.split("step-")[1].split()[0])
        for line in stderr.splitlines()
        if line.startswith("checkpoint step-") and " saved " in line
    ]


CONTINUE_MODES = [
    pytest.param(mode, marks=pytest.mark.scenario(f"disk-full-continue-{mode}"))
    for mode in ("sync", "async")
]


@pytest.mark.parametrize("mode", CONTINUE_MODES)
def test_disk_full_with_continue_loses_only_the_failed_save(mode: str, result: Case) -> None:
    run = result.attempts[-1]
    assert "training goes on" in run.stderr, run.stderr
    assert _saved_steps(run.stderr) == [5, 10, 20, 25, 30, 35, 40], (
        f"saves 15 and 44 failed; every other save must happen\n{result.describe()}"
    )


@pytest.mark.parametrize("mode", CONTINUE_MODES)
def test_disk_full_at_the_final_save_with_continue_finishes_the_run(
    mode: str, result: Case, golden: Golden
) -> None:
    """``continue`` holds for the last save too: exit 0, a warning and no traceback; the run
    is trained to the end and exported, and LATEST stays on the newest good checkpoint."""
    run = result.attempts[-1]
    assert run.returncode == 0, result.describe()
    assert_no_traceback(result)
    assert_losses_equal(result, golden)
    assert_weights_equal(result, golden)
    assert run.latest == step_name(40) and not debris(result.ckpt_dir)


@pytest.mark.scenario("disk-full-continue-sync")
def test_a_good_save_after_a_failed_one_leaves_a_clean_folder(result: Case) -> None:
    """(d) and (e) once the failed save 15 is followed by good saves."""
    assert_checkpoints_clean(result, 40)
