"""``strategy: hybrid`` (dp_shard 2 x tp 2: FSDP2 over tensor-parallel groups, 2-D DTensors)
through the real CLI, against one process (issue 17).

Four ranks, gloo, CPU, cpu/tiny. Ranks {0, 1} and {2, 3} are the tp groups; each reads its
data-parallel half (4 sequences) of the global batch of 8 that one process reads in one
micro-batch. Every run is 10 steps (checkpoints at 5 and 10). About 45 s on 2 cores (6
launches, 5 of 4 processes, the module's runs shared by its tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trainer_runs as tr

pytestmark = pytest.mark.distributed

# hybrid 2 x 2 vs one process, fp32, the same 8 samples per step: the tp partial products
# are summed as under strategy tensor, and the two data-parallel halves' gradients are
# reduce-scattered by FSDP (a mean of two half-batch means = the full-batch mean, since the
# loop weighs each rank by its target count). Only the order of the sums differs. Measured
# over the 10 steps: loss 2.1e-7 (max), first-step gradients 3.6e-7 (any rank), weights after
# 10 Adam steps 5.0e-6 (the same with sequence_parallel; the one-process resume of step 5:
# loss 1.9e-7). 1e-5 and 1e-4 as in test_tensor_parallel.py: a rank reading the wrong half of
# the batch, gradients left unsummed over dp_shard or tp, or a loss averaged per rank instead
# of per target moves the loss by > 1e-3.


def hybrid_cmd(name: str, *overrides: str) -> list[str]:
    """``python -m apt launch`` of 4 ranks, dp_shard 2 x tp 2, 4 sequences per tp group."""
    tp = "training.distributed.tp=2"
    batch = tr.GLOBAL_BATCH // 2
    return tr.strategy_cmd(name, "hybrid", tp, tr.TEN_STEPS, *overrides, nproc=4, batch_size=batch)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hybrid_parallel")


@pytest.fixture(scope="module")
def single(work: Path, one_process_run: Path) -> None:
    """runs/single and single-grads: the session's one-process run of 10 steps."""
    tr.copy_one_process_run(one_process_run, work)


@pytest.fixture(scope="module")
def hybrid(work: Path) -> tr.Finished:
    return tr.run(
        hybrid_cmd("hybrid", tr.first_gradients_hook(work / "hybrid-grads")), work
    ).check()


@pytest.fixture(scope="module")
def killed(work: Path) -> dict:
    """hybrid 2 x 2 with rank 3 crashing after step 7; then the same command again. The
    folder as the crash left it (LATEST: step 5) is also copied to ``runs/to-single``."""
    cmd = hybrid_cmd("killed", tr.FAULT_HOOK)
    return tr.crash_then_rerun(cmd, work, fault="die:3@7", copy_to="to-single")


def _matches_single(name: str, work: Path) -> None:
    ref = tr.train_losses(work / "runs" / "single")
    got = tr.train_losses(work / "runs" / name)
    assert sorted(ref) == list(range(1, 11))
    diffs = tr.loss_rel_diffs(got, ref)
    assert max(diffs.values()) < tr.LOSS_RTOL, diffs
    assert got[10] < got[1] - 0.5  # it trains (5.49 -> ~4.5)
    ref_w, got_w = (
        tr.final_weights(work / "runs" / "single"),
        tr.final_weights(work / "runs" / name),
    )
    assert sorted(got_w) == sorted(ref_w)
    assert tr.max_rel_diff(got_w, ref_w) < tr.WEIGHT_RTOL


def test_ten_steps_match_one_process(single: None, hybrid: tr.Finished, work: Path) -> None:
    _matches_single("hybrid", work)

    # tokens are counted once per data-parallel rank (2 of them), not once per rank (4)
    def tokens(name: str) -> dict[int, float]:
        rows = tr.records(work / "runs" / name)
        return {r["step"]: r["tokens_seen"] for r in rows if "train_loss" in r}

    assert tokens("hybrid") == tokens("single")


def test_first_gradients_match_one_process(single: None, hybrid: tr.Finished, work: Path) -> None:
    """After the first backward every rank's gradients, gathered from their 2-D shards
    (reduce-scattered over dp_shard, split over tp), are one process's gradients of the whole
    batch: replicated ones (norms) and split ones alike."""
    ref = tr.first_gradients(work / "single-grads", 0)
    for rank in range(4):
        grads = tr.first_gradients(work / "hybrid-grads", rank)
        assert sorted(grads) == sorted(ref)
        assert tr.max_rel_diff(grads, ref) < tr.GRAD_RTOL, rank


def test_sequence_parallel_inside_hybrid_matches_one_process(single: None, work: Path) -> None:
    done = tr.run(hybrid_cmd("hybrid-sp", "training.distributed.sequence_parallel=true"), work)
    done.check()
    _matches_single("hybrid-sp", work)


def test_checkpoints_are_dcp_shards_of_every_rank(hybrid: tr.Finished, work: Path) -> None:
    files = tr.checkpoint_files(work / "runs" / "hybrid", 10)
    for part in ("model", "optim"):
        assert {f"{part}/.metadata"} | {f"{part}/__{r}_0.distcp" for r in range(4)} <= files
    assert not any(f.endswith("model.safetensors") for f in files)
    assert "device mesh: dp_replicate 1 x dp_shard 2 x tp 2 (hybrid)" in hybrid.output


def test_crash_then_same_command_ends_bitwise_equal(
    killed: dict, hybrid: tr.Finished, work: Path
) -> None:
    tr.check_rerun_ends_as(killed, work, "hybrid")


def test_hybrid_checkpoint_resumes_in_one_process(killed: dict, single: None, work: Path) -> None:
    """DCP reshards the step-5 2-D shards into whole tensors; one process trains on to step
    10 as the one-process run did (the global batch stays 8, so the data cursor points at
    the same sample; --allow-config-change: the world size and batch_size are
    resume-critical)."""
    run_dir = work / "runs" / "to-single"
    dump = work / "to-single.loaded.safetensors"
    flags = ("--allow-config-change",)
    cmd = tr.single_cmd("to-single", tr.TEN_STEPS, tr.loaded_weights_hook(dump), flags=flags)
    done = tr.run(cmd, work).check()
    assert "resumed from" in done.output and "step 5)" in done.output
    assert tr.bitwise_equal(tr.read_weights(dump), tr.checkpoint_weights(run_dir, 5))
    got = tr.train_losses(run_dir)
    assert sorted(got) == list(range(1, 11))
    diffs = tr.loss_rel_diffs(got, tr.train_losses(work / "runs" / "single"))
    assert max(diffs.values()) < tr.LOSS_RTOL, diffs
