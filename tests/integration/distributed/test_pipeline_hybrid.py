"""``strategy: hybrid`` with ``pp`` (pp 2 x dp_shard 2: FSDP2 inside each pipeline stage)
through the real CLI, against one process (issue 17).

Four ranks, gloo, CPU, cpu/tiny. Stage 0 (embedding, block 0) lives on ranks {0, 1}, sharded
between them; stage 1 (block 1, final norm, head tied to the embedding) on ranks {2, 3}. The
pipelines {0, 2} and {1, 3} each read their data-parallel half (4 sequences) of the global
batch of 8 that one process reads in one micro-batch, cut by the schedule into 2 micro-batches.
Every run is 10 steps (checkpoints at 5 and 10). About 80 s on 2 cores (6 launches, 4 of 4
processes, 1 of 2).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trainer_runs as tr

pytestmark = pytest.mark.distributed

# pp 2 x dp_shard 2 vs one process, fp32, the same 8 samples per step. What differs is the
# order of sums: the pipeline's (micro-batch losses as token-loss sums / the step's targets,
# the tied embedding's two gradients added across stages) and FSDP's (the two data-parallel
# halves' gradients reduce-scattered). Measured over the 10 steps: loss 2.1e-7, first-step
# gradients 2.3e-7 (any rank), weights after 10 Adam steps 2.5e-6; resumed under fsdp x 2:
# loss 2.1e-7. 1e-5 / 1e-4 as in test_pipeline_parallel.py: a pipeline reading the other's
# half, FSDP gradients left unreduced after the schedule, or the tied gradient not summed
# moves the loss by > 1e-3 at once.


def pp_dp_cmd(name: str, *overrides: str) -> list[str]:
    """``python -m apt launch`` of 4 ranks, pp 2 x dp_shard 2, 4 sequences per pipeline."""
    pp, batch = "training.distributed.pp=2", tr.GLOBAL_BATCH // 2
    return tr.strategy_cmd(name, "hybrid", pp, tr.TEN_STEPS, *overrides, nproc=4, batch_size=batch)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline_hybrid")


@pytest.fixture(scope="module")
def single(work: Path, one_process_run: Path) -> None:
    """runs/single and single-grads: the session's one-process run of 10 steps."""
    tr.copy_one_process_run(one_process_run, work)


@pytest.fixture(scope="module")
def pp_dp(work: Path) -> tr.Finished:
    return tr.run(pp_dp_cmd("pp-dp", tr.first_gradients_hook(work / "pp-dp-grads")), work).check()


@pytest.fixture(scope="module")
def killed(work: Path) -> dict:
    """pp 2 x dp_shard 2 with rank 3 crashing after step 7; then the same command again. The
    folder as the crash left it (LATEST: step 5) is also copied to ``runs/to-fsdp``."""
    cmd = pp_dp_cmd("killed", tr.FAULT_HOOK)
    return tr.crash_then_rerun(cmd, work, fault="die:3@7", copy_to="to-fsdp")


def test_ten_steps_match_one_process(single: None, pp_dp: tr.Finished, work: Path) -> None:
    ref = tr.train_losses(work / "runs" / "single")
    got = tr.train_losses(work / "runs" / "pp-dp")
    assert sorted(got) == list(range(1, 11))
    diffs = tr.loss_rel_diffs(got, ref)
    assert max(diffs.values()) < tr.LOSS_RTOL, diffs
    assert got[10] < got[1] - 0.5  # it trains

    # tokens are counted once per data-parallel rank (2), not once per rank or stage (4)
    def tokens(run: str) -> dict[int, float]:
        rows = tr.records(work / "runs" / run)
        return {r["step"]: r["tokens_seen"] for r in rows if "train_loss" in r}

    assert tokens("pp-dp") == tokens("single")
    ref_w, got_w = (
        tr.final_weights(work / "runs" / "single"),
        tr.final_weights(work / "runs" / "pp-dp"),
    )
    assert sorted(got_w) == sorted(ref_w)  # the export gathers every stage and shard
    assert tr.max_rel_diff(got_w, ref_w) < tr.WEIGHT_RTOL
    assert "device mesh: pp 2 x dp_replicate 1 x dp_shard 2 x tp 1 (hybrid)" in pp_dp.output
    assert "(1f1b, FSDP2 over dp_shard 2)" in pp_dp.output


def test_first_gradients_match_one_process(single: None, pp_dp: tr.Finished, work: Path) -> None:
    """After the first step's schedule each rank's gradients, gathered from the FSDP shards of
    its stage, are one process's gradients of the whole batch (the tied embedding's on both
    stages: the sum of the lookup's and the head's)."""
    ref = tr.first_gradients(work / "single-grads", 0)
    ranks = [tr.first_gradients(work / "pp-dp-grads", r) for r in range(4)]
    assert sorted(ranks[0]) == sorted(["embed_tokens.weight", *(n for n in ref if "blocks.0" in n)])
    assert sorted(ranks[0]) == sorted(ranks[1]) and sorted(ranks[2]) == sorted(ranks[3])
    assert sorted(set(ranks[0]) | set(ranks[2])) == sorted(ref)
    for rank, grads in enumerate(ranks):
        assert tr.max_rel_diff(grads, {k: ref[k] for k in grads}) < tr.GRAD_RTOL, rank


def test_crash_then_same_command_ends_bitwise_equal(
    killed: dict, pp_dp: tr.Finished, work: Path
) -> None:
    tr.check_rerun_ends_as(killed, work, "pp-dp")


def test_checkpoint_resumes_under_fsdp(killed: dict, single: None, work: Path) -> None:
    """DCP reshards the step-5 checkpoint of 2 stages x 2 shards into fsdp x 2's shards of
    the whole model (each rank still reads 4 of the 8 sequences, so the data cursor points at
    the same sample); the run trains on to step 10 as the one-process run did."""
    dump = work / "to-fsdp.loaded.safetensors"
    flags = ("--allow-config-change",)  # the world size is resume-critical
    cmd = tr.launch_cmd("to-fsdp", "fsdp", tr.TEN_STEPS, tr.loaded_weights_hook(dump), flags=flags)
    done = tr.run(cmd, work).check()
    assert "resumed from" in done.output and "step 5)" in done.output
    run_dir = work / "runs" / "to-fsdp"
    assert tr.bitwise_equal(tr.read_weights(dump), tr.checkpoint_weights(run_dir, 5))
    got = tr.train_losses(run_dir)
    assert sorted(got) == list(range(1, 11))
    diffs = tr.loss_rel_diffs(got, tr.train_losses(work / "runs" / "single"))
    assert max(diffs.values()) < tr.LOSS_RTOL, diffs


def test_a_one_process_checkpoint_resumes_in_sharded_stages(single: None, work: Path) -> None:
    """The one-process run's gathered step-5 checkpoint resumed by pp 2 x dp_shard 2: every
    rank takes its stage's tensors and optimizer state and FSDP2 shards them; the run trains
    on to step 10 as the one-process run did."""
    run_dir = tr.one_process_checkpoint(work, "single-to-pp-dp")
    cmd = [*pp_dp_cmd("single-to-pp-dp"), "--allow-config-change"]  # another world size
    tr.check_trained_on_as_one_process(tr.run(cmd, work).check(), run_dir, work)


def test_interleaved_1f1b_over_fsdp_stages_matches_one_process(work: Path) -> None:
    """Four blocks, two stages per pipeline rank, each stage sharded over its 2 dp_shard ranks
    (the multi-stage schedule reduce-scatters each stage's gradients itself). Measured 2.0e-7."""
    blocks = "model.num_layers=4"
    tr.run(tr.single_cmd("single-4", tr.TEN_STEPS, blocks), work).check()
    schedule = "training.distributed.pipeline.schedule=interleaved_1f1b"
    done = tr.run(pp_dp_cmd("interleaved", blocks, schedule), work).check()
    assert "(interleaved_1f1b, FSDP2 over dp_shard 2)" in done.output
    got = tr.train_losses(work / "runs" / "interleaved")
    diffs = tr.loss_rel_diffs(got, tr.train_losses(work / "runs" / "single-4"))
    assert sorted(got) == list(range(1, 11)) and max(diffs.values()) < tr.LOSS_RTOL, diffs
