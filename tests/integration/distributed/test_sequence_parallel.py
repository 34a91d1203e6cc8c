"""``strategy: sequence`` (tp=2 with sequence parallelism) through the real CLI, against one
process (issue 17).

Two ranks, gloo, CPU, cpu/tiny (2 heads: one per rank; seq_len 32: 16 positions per rank
between the split regions). Both tp ranks read the same batch of 8, so a step trains on
exactly the batch of a step of one process. Every run is 10 steps (checkpoints at 5 and 10).
About 55 s on 2 cores (7 launches).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trainer_runs as tr
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

# sequence x2 vs one process, fp32, the same samples per step. As under strategy tensor, only
# the order of sums differs (reduce-scatter + all-gather instead of all-reduce; each norm
# weight's gradient summed over the two halves of the sequence): a few ulps per op.
# Measured over the 10 steps: loss 2.1e-7 (max), validation 2.1e-7; first-step gradients
# 4.6e-7 (max over tensors, the split ones gathered), the norms' 2.2e-7. 1e-5 leaves a wide
# margin and still fails on any real error: a norm gradient left a partial sum (half the
# positions: ~50% off), RoPE or the causal mask applied to a shard instead of the whole
# sequence, or a shard reduce-scattered along the wrong dimension moves the loss by > 1e-3.
NORMS = (
    "norm.weight",
    "blocks.0.attn_norm.weight",
    "blocks.0.mlp_norm.weight",
    "blocks.1.attn_norm.weight",
    "blocks.1.mlp_norm.weight",
)


def sequence_cmd(name: str, *overrides: str) -> list[str]:
    """``python -m apt launch`` of 2 tp ranks with sequence parallelism, each reading the
    whole batch of 8."""
    return tr.strategy_cmd(name, "sequence", tr.TEN_STEPS, *overrides)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sequence_parallel")


@pytest.fixture(scope="module")
def single(work: Path, one_process_run: Path) -> None:
    """runs/single and single-grads: the session's one-process run of 10 steps."""
    tr.copy_one_process_run(one_process_run, work)


@pytest.fixture(scope="module")
def sequence(work: Path) -> tr.Finished:
    return tr.run(
        sequence_cmd("sequence", tr.first_gradients_hook(work / "sequence-grads")), work
    ).check()


@pytest.fixture(scope="module")
def killed(work: Path) -> dict:
    """sequence x2 with rank 1 crashing after step 7; then the same command again. The folder
    as the crash left it (LATEST: step 5) is also copied to ``runs/to-single``."""
    cmd = sequence_cmd("killed", tr.FAULT_HOOK)
    return tr.crash_then_rerun(cmd, work, fault="die:1@7", copy_to="to-single")


def test_ten_steps_match_one_process(single: None, sequence: tr.Finished, work: Path) -> None:
    ref = tr.train_losses(work / "runs" / "single")
    got = tr.train_losses(work / "runs" / "sequence")
    assert sorted(ref) == list(range(1, 11))
    diffs = tr.loss_rel_diffs(got, ref)
    assert max(diffs.values()) < tr.LOSS_RTOL, diffs
    assert got[10] < got[1] - 0.5  # it trains (5.49 -> ~4.6)
    # evaluation (steps 0 and 10) runs on sequence shards too
    val = tr.loss_rel_diffs(
        tr.val_losses(work / "runs" / "sequence"), tr.val_losses(work / "runs" / "single")
    )
    assert sorted(val) == [0, 10] and max(val.values()) < tr.LOSS_RTOL, val
    ref_w = tr.final_weights(work / "runs" / "single")
    got_w = tr.final_weights(work / "runs" / "sequence")
    assert sorted(got_w) == sorted(ref_w)
    assert tr.max_rel_diff(got_w, ref_w) < tr.WEIGHT_RTOL


def test_gradient_accumulation_matches_one_process(single: None, work: Path) -> None:
    """Two micro-batches of 4 per step: the second backward adds its partial norm gradients
    to the whole ones of the first, which must sum them over the ranks too (measured: loss
    within 2.8e-7 of one process's single micro-batch of 8)."""
    cmd = sequence_cmd(
        "accumulated", "training.batch_size=4", "training.gradient_accumulation_steps=2"
    )
    tr.run(cmd, work).check()
    ref = tr.train_losses(work / "runs" / "single")
    diffs = tr.loss_rel_diffs(tr.train_losses(work / "runs" / "accumulated"), ref)
    assert max(diffs.values()) < tr.LOSS_RTOL, diffs


def test_gradients_match_one_process(single: None, sequence: tr.Finished, work: Path) -> None:
    """First backward: every gradient equals one process's; each norm weight's, summed over
    the two ranks' halves of the sequence, is the whole one on both ranks."""
    ref = load_file(str(work / "single-grads.rank0.safetensors"))
    ranks = [load_file(str(work / f"sequence-grads.rank{r}.safetensors")) for r in (0, 1)]
    assert sorted(ranks[0]) == sorted(ref) == sorted(ranks[1])
    assert tr.max_rel_diff(ranks[0], ref) < tr.GRAD_RTOL
    for name in NORMS:
        assert tr.max_rel_diff({name: ranks[0][name]}, {name: ref[name]}) < tr.GRAD_RTOL, name
        assert tr.max_rel_diff({name: ranks[1][name]}, {name: ref[name]}) < tr.GRAD_RTOL, name


def test_checkpoints_are_dcp_shards_of_both_ranks(sequence: tr.Finished, work: Path) -> None:
    files = tr.checkpoint_files(work / "runs" / "sequence", 10)
    for part in ("model", "optim"):
        assert {f"{part}/.metadata", f"{part}/__0_0.distcp", f"{part}/__1_0.distcp"} <= files
    assert "device mesh: dp_replicate 1 x dp_shard 1 x tp 2 (sequence)" in sequence.output


def test_crash_then_same_command_ends_bitwise_equal(
    killed: dict, sequence: tr.Finished, work: Path
) -> None:
    tr.check_rerun_ends_as(killed, work, "sequence")


def test_sequence_checkpoint_resumes_in_one_process(killed: dict, single: None, work: Path) -> None:
    """DCP reshards the step-5 checkpoint (split weights, replicated norms) into whole
    tensors; one process trains on to step 10 as the one-process run did."""
    run_dir = work / "runs" / "to-single"
    dump = work / "to-single.loaded.safetensors"
    cmd = tr.single_cmd("to-single", tr.TEN_STEPS, tr.loaded_weights_hook(dump))
    done = tr.run(cmd, work).check()
    assert "resumed from" in done.output and "step 5)" in done.output
    assert tr.bitwise_equal(tr.read_weights(dump), tr.checkpoint_weights(run_dir, 5))
    got = tr.train_losses(run_dir)
    assert sorted(got) == list(range(1, 11))
    diffs = tr.loss_rel_diffs(got, tr.train_losses(work / "runs" / "single"))
    assert max(diffs.values()) < tr.LOSS_RTOL, diffs


def test_sequence_length_not_divisible_stops_both_ranks(work: Path) -> None:
    done = tr.run(sequence_cmd("bad-seq-len", "data.seq_len=31"), work, timeout=60)
    assert done.returncode == 2, done.output[-3000:]  # a config error, on both ranks
    assert done.output.count("config error: data.seq_len is 31") == 2, done.output[-3000:]
    assert "tp 2" in done.output
