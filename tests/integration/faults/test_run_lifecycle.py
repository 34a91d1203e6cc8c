"""SIGTERM, reruns of a finished run, config drift and extending a run, through the real CLI."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from faults_harness import (
    SIGNAL_ENV,
    Case,
    Golden,
    assert_like_golden,
    assert_no_traceback,
    resumed_from,
    step_name,
)
from faults_scenarios import Context, scenario

pytestmark = pytest.mark.faults

Snapshot = dict[str, bytes]


def _snapshot(case: Case) -> Snapshot:
    """Every file of the run folder, by path."""
    return {
        p.relative_to(case.run_dir).as_posix(): p.read_bytes()
        for p in sorted(case.run_dir.rglob("*"))
        if p.is_file()
    }


def _changed(before: Snapshot, after: Snapshot) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


# --------------------------------------------------------------------- scenarios
#: SIGTERM arrives inside these steps (after the first of their two micro-batches): the last
#: step of epoch 0, the step before the last, the last step.
SIGTERM_STEPS = (19, 43, 44)


def _sigterm(step: int, ctx: Context) -> Case:
    case = ctx.case()
    case.run(f"SIGTERM in step {step}", env={SIGNAL_ENV: f"SIGTERM@batch_end:{step - 1}"})
    case.run("rerun")
    return case


for _step in SIGTERM_STEPS:
    scenario(f"sigterm-{_step}", runs=2)(lambda ctx, step=_step: _sigterm(step, ctx))


@scenario("sigterm-in-eval", runs=2)
def _sigterm_in_eval(ctx: Context) -> Case:
    case = ctx.case()
    case.run("SIGTERM as the step-8 evaluation starts", env={SIGNAL_ENV: "SIGTERM@eval_start:8"})
    case.run("rerun")
    return case


@scenario("finished-rerun", runs=1)
def _finished_rerun(ctx: Context) -> tuple[Case, Snapshot, Snapshot]:
    case = ctx.copy_of_golden()
    before = _snapshot(case)
    case.run("rerun")
    return case, before, _snapshot(case)


def _drift(change: str, ctx: Context) -> tuple[Case, Snapshot, Snapshot]:
    case = ctx.copy_of_golden()
    before = _snapshot(case)
    case.overrides = (change,)
    case.run(f"rerun with {change}")
    return case, before, _snapshot(case)


DRIFTS = {
    "drift-shape": ("model.hidden_size=48", "model.hidden_size: 32 -> 48"),
    "drift-batch": ("training.batch_size=8", "training.batch_size: 16 -> 8"),
}
for _name, (_change, _) in DRIFTS.items():
    scenario(_name, runs=1)(lambda ctx, change=_change: _drift(change, ctx))


@scenario("extend", runs=2)
def _extend(ctx: Context) -> Case:
    case = ctx.case("training.max_steps=40")
    case.run("40 steps")
    case.overrides = ()  # the profile's 44 steps
    case.run("extended to 44")
    return case


# --------------------------------------------------------------------- checks
SIGTERM_PARAMS = [
    pytest.param(step, marks=pytest.mark.scenario(f"sigterm-{step}")) for step in SIGTERM_STEPS
]


@pytest.mark.parametrize("step", SIGTERM_PARAMS)
def test_sigterm_exits_143_after_saving_and_the_rerun_ends_bitwise_equal(
    step: int, result: Case, golden: Golden
) -> None:
    stopped = result.attempts[0]
    assert stopped.returncode == 128 + signal.SIGTERM, result.describe()
    assert "received SIGTERM" in stopped.stderr and "Run the same command" in stopped.stderr
    assert_no_traceback(result)
    # The exit save holds every step that was trained: nothing is lost.
    assert stopped.latest == step_name(stopped.last_step or 0), (
        f"SIGTERM in step {step}: trained to step {stopped.last_step}, but LATEST is "
        f"{stopped.latest}\n{stopped.describe()}"
    )
    assert_like_golden(result, golden)


@pytest.mark.parametrize("step", SIGTERM_PARAMS)
def test_sigterm_saves_at_the_end_of_the_current_step(step: int, result: Case) -> None:
    """ "Save at the next step boundary": the signal came during step ``step``, so the
    checkpoint is of that step and no later step starts (one more step can outlast a
    scheduler's grace period, after which a SIGKILL loses the work)."""
    stopped = result.attempts[0]
    assert (stopped.last_step, stopped.latest) == (step, step_name(step)), (
        f"SIGTERM during step {step}: the run went on to step {stopped.last_step} and saved "
        f"{stopped.latest}"
    )


@pytest.mark.scenario("sigterm-in-eval")
def test_sigterm_during_an_evaluation_saves_without_waiting_for_it(
    result: Case, golden: Golden
) -> None:
    """The evaluation is abandoned between two batches: the run saves step 8 and exits; the
    rerun evaluates step 8 first, so it logs and ends exactly as the run that was never
    stopped."""
    stopped, rerun = result.attempts
    assert stopped.returncode == 128 + signal.SIGTERM, result.describe()
    assert (stopped.last_step, stopped.latest) == (8, step_name(8)), result.describe()

    def step8_evals(run_dir: Path) -> list[float]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [r["val_loss"] for r in map(json.loads, lines) if r["step"] == 8 and "val_loss" in r]

    assert step8_evals(result.run_dir) == step8_evals(golden.case.run_dir)  # once, same value
    assert "received SIGTERM" in stopped.stderr and rerun.returncode == 0
    assert_no_traceback(result)
    assert_like_golden(result, golden)


@pytest.mark.scenario("finished-rerun")
def test_rerun_of_a_finished_run_trains_nothing(result: tuple[Case, Snapshot, Snapshot]) -> None:
    case, before, after = result
    rerun = case.attempts[-1]
    assert rerun.returncode == 0, case.describe()
    assert "run already complete at step 44" in rerun.stderr, rerun.stderr
    assert_no_traceback(case)
    assert _changed(before, after) == [], "the rerun of a finished run changed files"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.scenario(n)) for n in DRIFTS])
def test_config_drift_is_refused_with_a_readable_diff(
    name: str, result: tuple[Case, Snapshot, Snapshot]
) -> None:
    case, _, _ = result
    refused = case.attempts[-1]
    assert refused.returncode == 2, case.describe()
    assert refused.stderr.count("config error:") == 1, refused.stderr
    assert DRIFTS[name][1] in refused.stderr and "--allow-config-change" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.scenario(n)) for n in DRIFTS])
def test_refused_rerun_leaves_the_run_folder_as_it_was(
    name: str, result: tuple[Case, Snapshot, Snapshot]
) -> None:
    """A refused rerun must not rewrite the run's config.yaml/provenance.json with the config
    it refused (the folder would then describe a run that never happened)."""
    _, before, after = result
    assert _changed(before, after) == [], "the refused rerun changed files"


@pytest.mark.scenario("extend")
def test_a_larger_max_steps_extends_a_finished_run(result: Case, golden: Golden) -> None:
    first, extended = result.attempts
    assert first.returncode == 0 and first.latest == step_name(40), result.describe()
    assert "extending a finished run from step 40 to 44" in extended.stderr, extended.stderr
    assert resumed_from(extended) == (2, 40)
    assert_like_golden(result, golden)
