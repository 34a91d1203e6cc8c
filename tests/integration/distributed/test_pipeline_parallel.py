"""``strategy: pipeline`` (pp=2) through the real CLI, against one process (issue 17).

Two ranks, gloo, CPU, cpu/tiny: stage 0 (rank 0) runs the embedding and block 0, stage 1
(rank 1) block 1, the final norm and the head tied to the embedding. Both ranks read the
same batch of 8; the schedule cuts it into 2 micro-batches (the default for pp 2 and one
loader batch per step), so a step trains on exactly the batch of a step of one process. Every
run is 10 steps (checkpoints at 5 and 10). The interleaved schedule runs a 4-block model, two
stages per rank. About 45 s on 2 cores (10 launches, the module's runs shared by its tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trainer_runs as tr
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

# pipeline x2 vs one process, fp32, the same samples per step. What differs is the order of
# some sums: each micro-batch's loss is its token losses' sum / the step's targets (one
# process: the mean x count / targets), the gradients of two micro-batches are added, and the
# tied embedding's two gradients (lookup on stage 0, head on stage 1) are added across ranks.
# Measured over the 10 steps: loss 2.1e-7 (1f1b and gpipe alike), 1.0e-7 (interleaved, 4
# blocks); first-step gradients 2.9e-7 (max over tensors, either rank; the tied embedding's
# 1.8e-7); weights after 10 steps 2.5e-6. 1e-5 leaves a >= 30x margin and fails on any real
# error: a loss scaled by the micro-batch count (torch's default scale_grads), the tied
# gradient not summed, or a stage skipping a block moves the loss by > 1e-3 at once.
FOUR_BLOCKS = "model.num_layers=4"


def pipeline_cmd(name: str, *overrides: str) -> list[str]:
    """``python -m apt launch`` of 2 pipeline ranks, each reading the whole batch of 8."""
    return tr.strategy_cmd(name, "pipeline", tr.TEN_STEPS, *overrides)


def schedule(name: str) -> str:
    return f"training.distributed.pipeline.schedule={name}"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline_parallel")


@pytest.fixture(scope="module")
def single(work: Path, one_process_run: Path) -> None:
    """runs/single and single-grads: the session's one-process run of 10 steps."""
    tr.copy_one_process_run(one_process_run, work)


@pytest.fixture(scope="module")
def one_f_one_b(work: Path) -> tr.Finished:
    cmd = pipeline_cmd("1f1b", schedule("1f1b"), tr.first_gradients_hook(work / "1f1b-grads"))
    return tr.run(cmd, work).check()


@pytest.fixture(scope="module")
def gpipe(work: Path) -> tr.Finished:
    return tr.run(pipeline_cmd("gpipe", schedule("gpipe")), work).check()


@pytest.fixture(scope="module")
def killed(work: Path) -> dict:
    """1f1b x2 with rank 1 crashing after step 7; then the same command again. The folder
    as the crash left it (LATEST: step 5) is also copied to ``runs/to-single``."""
    cmd = pipeline_cmd("killed", schedule("1f1b"), tr.FAULT_HOOK)
    return tr.crash_then_rerun(cmd, work, fault="die:1@7", copy_to="to-single")


@pytest.mark.parametrize("name", ["1f1b", "gpipe"])
def test_ten_steps_match_one_process(
    name: str, single: None, one_f_one_b: tr.Finished, gpipe: tr.Finished, work: Path
) -> None:
    ref = tr.train_losses(work / "runs" / "single")
    got = tr.train_losses(work / "runs" / name)
    assert sorted(ref) == list(range(1, 11))
    diffs = tr.loss_rel_diffs(got, ref)
    assert max(diffs.values()) < tr.LOSS_RTOL, diffs
    assert got[10] < got[1] - 0.5  # it trains (5.49 -> ~4.6)
    val, val_ref = tr.val_losses(work / "runs" / name), tr.val_losses(work / "runs" / "single")
    assert sorted(val) == sorted(val_ref) == [0, 10]
    assert max(tr.loss_rel_diffs(val, val_ref).values()) < tr.LOSS_RTOL

    # tokens are counted once per data-parallel rank, not once per stage
    def tokens(run: str) -> dict[int, float]:
        rows = tr.records(work / "runs" / run)
        return {r["step"]: r["tokens_seen"] for r in rows if "train_loss" in r}

    assert tokens(name) == tokens("single")
    ref_w = tr.final_weights(work / "runs" / "single")
    got_w = tr.final_weights(work / "runs" / name)
    assert sorted(got_w) == sorted(ref_w)  # the export gathers every stage, one name each
    assert tr.max_rel_diff(got_w, ref_w) < tr.WEIGHT_RTOL


def test_gradients_match_one_process(single: None, one_f_one_b: tr.Finished, work: Path) -> None:
    """First step: each rank holds the gradients of its stage's parameters, equal to one
    process's; the tied embedding's (both ranks) is the sum of the lookup's and the head's."""
    ref = load_file(str(work / "single-grads.rank0.safetensors"))
    ranks = [load_file(str(work / f"1f1b-grads.rank{r}.safetensors")) for r in (0, 1)]
    assert sorted(ranks[0]) == sorted(["embed_tokens.weight", *(n for n in ref if "blocks.0" in n)])
    assert "norm.weight" in ranks[1] and "blocks.1.mlp.up_proj.weight" in ranks[1]
    assert sorted(set(ranks[0]) | set(ranks[1])) == sorted(ref)
    for grads in ranks:
        assert tr.max_rel_diff(grads, {k: ref[k] for k in grads}) < tr.GRAD_RTOL


def test_checkpoints_are_dcp_shards_with_the_models_names(
    single: None, one_f_one_b: tr.Finished, work: Path
) -> None:
    run_dir = work / "runs" / "1f1b"
    files = tr.checkpoint_files(run_dir, 10)
    for part in ("model", "optim"):
        assert {f"{part}/.metadata", f"{part}/__0_0.distcp", f"{part}/__1_0.distcp"} <= files
    assert sorted(tr.checkpoint_weights(run_dir, 10)) == sorted(
        tr.checkpoint_weights(work / "runs" / "single", 10)
    )
    assert "device mesh: pp 2 x dp_replicate 1 x dp_shard 1 x tp 1 (pipeline)" in (
        one_f_one_b.output
    )
    assert "pipeline stages 0: blocks 0-0, 1: blocks 1-1 (1f1b)" in one_f_one_b.output


def test_crash_then_same_command_ends_bitwise_equal(
    killed: dict, one_f_one_b: tr.Finished, work: Path
) -> None:
    tr.check_rerun_ends_as(killed, work, "1f1b")


def test_pp2_checkpoint_resumes_in_one_process(killed: dict, single: None, work: Path) -> None:
    """DCP gathers the two stages' tensors (and their optimizer state, whose parameter groups
    name every stage's parameters) into one process, which trains on to step 10 as the
    one-process run did."""
    run_dir = work / "runs" / "to-single"
    dump = work / "to-single.loaded.safetensors"
    cmd = tr.single_cmd("to-single", tr.TEN_STEPS, tr.loaded_weights_hook(dump))
    done = tr.run(cmd, work).check()
    assert "resumed from" in done.output and "step 5)" in done.output
    saved = tr.checkpoint_weights(run_dir, 5)
    loaded = tr.read_weights(dump)
    assert tr.bitwise_equal({k: loaded[k] for k in saved}, saved)
    got = tr.train_losses(run_dir)
    assert sorted(got) == list(range(1, 11))
    diffs = tr.loss_rel_diffs(got, tr.train_losses(work / "runs" / "single"))
    assert max(diffs.values()) < tr.LOSS_RTOL, diffs


def test_interleaved_1f1b_matches_one_process(work: Path) -> None:
    """Four blocks, two stages per rank (rank 0: blocks 0 and 2, rank 1: blocks 1 and 3)."""
    ref = tr.run(tr.single_cmd("single-4", tr.TEN_STEPS, FOUR_BLOCKS), work).check()
    done = tr.run(pipeline_cmd("interleaved", FOUR_BLOCKS, schedule("interleaved_1f1b")), work)
    done.check()
    assert "stages 0: blocks 0-0, 1: blocks 1-1, 2: blocks 2-2, 3: blocks 3-3" in done.output
    got = tr.train_losses(work / "runs" / "interleaved")
    diffs = tr.loss_rel_diffs(got, tr.train_losses(work / "runs" / "single-4"))
    assert max(diffs.values()) < tr.LOSS_RTOL, diffs
    assert ref.returncode == 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.num_layers=3", "model.num_layers 3 does not split evenly over 2 pipeline"),
        ("training.distributed.pipeline.microbatches=3", "pipeline.microbatches is 3: it must"),
        ("training.distributed.pp=4", "pp 4 = 4, but the world size is 2"),
    ],
)
def test_layout_errors_stop_both_ranks(work: Path, override: str, message: str) -> None:
    name = f"bad-{override.split('.')[-1].replace('=', '-')}"
    done = tr.run(pipeline_cmd(name, override), work, timeout=60)
    assert done.returncode == 2, done.output[-3000:]  # a config error, on both ranks
    assert done.output.count("config error: ") == 2, done.output[-3000:]
    assert message in done.output, done.output[-3000:]


def test_a_one_process_checkpoint_resumes_in_pipeline_stages(single: None, work: Path) -> None:
    """The one-process run's gathered checkpoint of step 5 (whole model, optimizer keyed by
    name) resumed by 2 pipeline ranks: each loads its stages' tensors, bitwise, and their
    optimizer state, and trains on to step 10 as the one-process run did."""
    run_dir = tr.one_process_checkpoint(work, "single-to-pp")
    dump = work / "single-to-pp.loaded.rank{rank}.safetensors"
    done = tr.run(pipeline_cmd("single-to-pp", tr.loaded_weights_hook(dump)), work).check()
    tr.check_trained_on_as_one_process(done, run_dir, work)
    saved = tr.checkpoint_weights(run_dir, 5)
    stages = [tr.read_weights(Path(str(dump).format(rank=r))) for r in (0, 1)]
    assert "blocks.0.attn.q_proj.weight" in stages[0] and "norm.weight" in stages[1]
    assert sorted(set(stages[0]) | set(stages[1])) == sorted(saved)
    for stage in stages:
        assert tr.bitwise_equal(stage, {k: saved[k] for k in stage})
