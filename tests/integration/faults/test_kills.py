"""SIGKILL a real training run anywhere, run the same command again: the same run comes out.

Every case compares with the golden (never killed) run of the same config: per-step losses and
final weights bitwise equal, no traceback, no debris, LATEST intact (``assert_like_golden``).
The profile has dropout and 2 micro-batches per optimizer step; steps 1-19 are epoch 0, 20-38
epoch 1, 39-44 epoch 2; checkpoints every 5 steps. During step k the run state shows
``global_step == k - 1`` (the points of ``APT_TEST_SIGNAL_AT`` use that number).
"""

from __future__ import annotations

import functools
import random
import signal

import pytest
from faults_harness import (
    SIGNAL_ENV,
    Case,
    Golden,
    assert_like_golden,
    killed_by,
    resumed_from,
    step_name,
)
from faults_scenarios import Context, scenario

pytestmark = pytest.mark.faults

SEEDS = (0, 1, 2)


def sigkill_at(event: str, step: int) -> dict[str, str]:
    return {SIGNAL_ENV: f"SIGKILL@{event}:{step}"}


# --------------------------------------------------------------------- scenarios
def _random_kill(seed: int, ctx: Context) -> tuple[Case, float]:
    # Anchored on the first logged step (start-up time varies with machine load), the delay
    # falls anywhere in the golden run's training window: in a step, an eval or a save.
    delay = random.Random(seed).uniform(0.0, 0.8 * ctx.golden.window)
    case = ctx.case()
    case.start("killed").kill_after_first_step(delay)
    case.run("resume")
    return case, delay


for _seed in SEEDS:
    scenario(f"random-kill-{_seed}", runs=2)(functools.partial(_random_kill, _seed))


@scenario("mid-accumulation", runs=2)
def _mid_accumulation(ctx: Context) -> Case:
    case = ctx.case()
    # Step 8's first micro-batch has run forward and backward; its second has not.
    case.run("killed in step 8", env=sigkill_at("batch_end", 7))
    case.run("resume")
    return case


@scenario("double-resume", runs=3)
def _double_resume(ctx: Context) -> Case:
    case = ctx.case()
    # Gradients of step 23 complete, parameters not updated yet.
    case.run("killed in step 23", env=sigkill_at("before_optimizer_step", 22))
    # Parameters of step 28 updated; the LR scheduler and the step counter not yet.
    case.run("resumed, killed in step 28", env=sigkill_at("after_optimizer_step", 27))
    case.run("resumed again")
    return case


@scenario("two-workers", runs=2)
def _two_workers(ctx: Context) -> Case:
    case = ctx.case("data.num_workers=2")
    case.run("killed in step 14", env=sigkill_at("batch_end", 13))
    case.run("resume")
    return case


@scenario("epoch-end-checkpoint", runs=2)
def _epoch_end_checkpoint(ctx: Context) -> Case:
    # Saves every 19 steps: at step 19, the last step of epoch 0 (and 38, the last of epoch 1).
    case = ctx.case("training.checkpoints.save_interval=19")
    case.run("killed in step 23", env=sigkill_at("batch_end", 22))
    case.run("resume")
    return case


@scenario("kill-after-final-commit", runs=2)
def _kill_after_final_commit(ctx: Context) -> Case:
    case = ctx.case()
    case.run("killed", env=sigkill_at("checkpoint_save", ctx.golden.final_step))
    case.run("rerun")
    return case


# --------------------------------------------------------------------- checks
@pytest.mark.parametrize(
    "seed", [pytest.param(s, marks=pytest.mark.scenario(f"random-kill-{s}")) for s in SEEDS]
)
def test_sigkill_at_a_random_moment(seed: int, result: tuple[Case, float], golden: Golden) -> None:
    case, delay = result
    last = case.attempts[0].last_step
    print(f"seed {seed}: SIGKILL {delay:.3f} s after step 1; last logged step {last}")
    assert killed_by(case.attempts[0], signal.SIGKILL), (
        f"the kill {delay:.3f} s after the first step came after the run ended\n{case.describe()}"
    )
    assert_like_golden(case, golden)


@pytest.mark.scenario("mid-accumulation")
def test_sigkill_between_the_micro_batches_of_a_step(result: Case, golden: Golden) -> None:
    killed, resumed = result.attempts
    assert killed_by(killed, signal.SIGKILL), result.describe()
    assert killed.last_step == 7, "the kill did not land inside step 8"
    assert resumed_from(resumed) == (0, 5), result.describe()
    assert_like_golden(result, golden)


@pytest.mark.scenario("double-resume")
def test_killed_twice_in_the_second_epoch(result: Case, golden: Golden) -> None:
    first, second, third = result.attempts
    assert killed_by(first, signal.SIGKILL) and killed_by(second, signal.SIGKILL), result.describe()
    assert resumed_from(second) == (1, 20)
    # Step 25 was written by the first resumed process: a resume of a resume.
    assert resumed_from(third) == (1, 25)
    assert_like_golden(result, golden)


@pytest.mark.scenario("two-workers")
def test_two_dataloader_workers(result: Case, golden: Golden) -> None:
    """Killed mid-step with 2 workers prefetching; compared with the golden run of 0 workers
    (the batches, and so the whole run, must not depend on the number of workers)."""
    killed, resumed = result.attempts
    assert killed_by(killed, signal.SIGKILL), result.describe()
    assert resumed_from(resumed) == (0, 10)
    assert_like_golden(result, golden)


@pytest.mark.scenario("epoch-end-checkpoint")
def test_resume_from_a_checkpoint_of_the_last_step_of_an_epoch(
    result: Case, golden: Golden
) -> None:
    """Any save_interval that divides the epoch length saves at an epoch's last step; a
    resume from there must start the next epoch with all of its batches."""
    killed, resumed = result.attempts
    assert killed_by(killed, signal.SIGKILL) and killed.latest == step_name(19), killed.describe()
    assert resumed_from(resumed) == (0, 19)
    assert_like_golden(result, golden)


@pytest.mark.scenario("kill-after-final-commit")
def test_sigkill_after_the_final_checkpoint_still_ends_with_a_final_model(
    result: Case, golden: Golden
) -> None:
    """Killed between the final checkpoint's commit and the export of ``final_model/``: the
    rerun finds the run complete, and the final model must be there afterwards."""
    killed, rerun = result.attempts
    assert killed_by(killed, signal.SIGKILL), result.describe()
    assert killed.last_step == golden.final_step
    assert killed.latest == step_name(golden.final_step), "the final checkpoint is not committed"
    assert rerun.returncode == 0 and "run already complete" in rerun.stderr, result.describe()
    assert_like_golden(result, golden)
