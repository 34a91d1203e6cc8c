"""``strategy: tensor`` (tp=2) through the real CLI, against one process (issue 17).

Two ranks, gloo, CPU, cpu/tiny (2 heads: one per rank). Both tp ranks read the same batch of 8,
so a step of ``tensor`` x2 trains on exactly the batch of a step of one process; only how the
sums are split differs. Every run is 10 steps (checkpoints at 5 and 10). About 35 s on 2 cores
(7 launches, the module's runs shared by its tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trainer_runs as tr
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

# tensor x2 vs one process, fp32, the same samples per step: each rank computes its half of
# the heads, of the MLP width and of the vocabulary, and the partial products are summed over
# the ranks (o_proj, down_proj, the embedding, the softmax denominators of the loss-parallel
# cross-entropy). Only the order of those sums differs: a few ulps per op, ~1e-7 relative.
# Measured over the 10 steps: loss 2.1e-7 (max); first-step gradients 4.4e-7 (max over
# tensors, the split ones gathered), the replicated norms' 2.1e-7. 1e-5 leaves a >= 20x
# margin and still fails on any real error: a head count left global, a missing all-reduce, a
# tie broken between embedding and head, or the two ranks reading different batches moves the
# loss by > 1e-3 at once.
REPLICATED = ("norm.weight", "blocks.0.attn_norm.weight", "blocks.1.mlp_norm.weight")


def tensor_cmd(name: str, *overrides: str) -> list[str]:
    """``python -m apt launch`` of 2 tp ranks, each reading the whole batch of 8."""
    return tr.strategy_cmd(name, "tensor", tr.TEN_STEPS, *overrides)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tensor_parallel")


@pytest.fixture(scope="module")
def single(work: Path, one_process_run: Path) -> None:
    """runs/single and single-grads: the session's one-process run of 10 steps."""
    tr.copy_one_process_run(one_process_run, work)


@pytest.fixture(scope="module")
def tensor(work: Path) -> tr.Finished:
    return tr.run(
        tensor_cmd("tensor", tr.first_gradients_hook(work / "tensor-grads")), work
    ).check()


@pytest.fixture(scope="module")
def killed(work: Path) -> dict:
    """tensor x2 with rank 1 crashing after step 7; then the same command again. The folder
    as the crash left it (LATEST: step 5) is also copied to ``runs/to-single``."""
    cmd = tensor_cmd("killed", tr.FAULT_HOOK)
    return tr.crash_then_rerun(cmd, work, fault="die:1@7", copy_to="to-single")


def test_ten_steps_match_one_process(single: None, tensor: tr.Finished, work: Path) -> None:
    ref = tr.train_losses(work / "runs" / "single")
    got = tr.train_losses(work / "runs" / "tensor")
    assert sorted(ref) == list(range(1, 11))
    diffs = tr.loss_rel_diffs(got, ref)
    assert max(diffs.values()) < tr.LOSS_RTOL, diffs
    assert got[10] < got[1] - 0.5  # it trains (5.49 -> ~4.6)

    # tokens are counted once per data-parallel rank, not once per tp rank
    def tokens(name: str) -> dict[int, float]:
        rows = tr.records(work / "runs" / name)
        return {r["step"]: r["tokens_seen"] for r in rows if "train_loss" in r}

    assert tokens("tensor") == tokens("single")
    ref_w, got_w = (
        tr.final_weights(work / "runs" / "single"),
        tr.final_weights(work / "runs" / "tensor"),
    )
    assert sorted(got_w) == sorted(ref_w)
    assert tr.max_rel_diff(got_w, ref_w) < tr.WEIGHT_RTOL


def test_gradients_match_one_process(single: None, tensor: tr.Finished, work: Path) -> None:
    """First backward: every gradient (the split ones gathered) equals one process's; a
    replicated parameter's (the norms) is the same on both tp ranks, as computed in one."""
    ref = load_file(str(work / "single-grads.rank0.safetensors"))
    ranks = [load_file(str(work / f"tensor-grads.rank{r}.safetensors")) for r in (0, 1)]
    assert sorted(ranks[0]) == sorted(ref) == sorted(ranks[1])
    assert tr.max_rel_diff(ranks[0], ref) < tr.GRAD_RTOL
    for name in REPLICATED:
        assert tr.max_rel_diff({name: ranks[0][name]}, {name: ref[name]}) < tr.GRAD_RTOL, name
        assert tr.max_rel_diff({name: ranks[1][name]}, {name: ref[name]}) < tr.GRAD_RTOL, name


def test_checkpoints_are_dcp_shards_of_both_ranks(tensor: tr.Finished, work: Path) -> None:
    files = tr.checkpoint_files(work / "runs" / "tensor", 10)
    for part in ("model", "optim"):
        assert {f"{part}/.metadata", f"{part}/__0_0.distcp", f"{part}/__1_0.distcp"} <= files
    assert not any(f.endswith("model.safetensors") for f in files)
    assert "device mesh: dp_replicate 1 x dp_shard 1 x tp 2 (tensor)" in tensor.output


def test_crash_then_same_command_ends_bitwise_equal(
    killed: dict, tensor: tr.Finished, work: Path
) -> None:
    tr.check_rerun_ends_as(killed, work, "tensor")


def test_tp2_checkpoint_resumes_in_one_process(killed: dict, single: None, work: Path) -> None:
    """DCP reshards the tp=2 shards of step 5 into whole tensors; one process trains on to
    step 10 as the one-process run did (the data cursor counts data-parallel batches)."""
    run_dir = work / "runs" / "to-single"
    dump = work / "to-single.loaded.safetensors"
    cmd = tr.single_cmd("to-single", tr.TEN_STEPS, tr.loaded_weights_hook(dump))
    done = tr.run(cmd, work).check()
    assert "resumed from" in done.output and "step 5)" in done.output
    saved = tr.checkpoint_weights(run_dir, 5)
    assert tr.bitwise_equal(tr.read_weights(dump), saved)
    got = tr.train_losses(run_dir)
    assert sorted(got) == list(range(1, 11))
    diffs = tr.loss_rel_diffs(got, tr.train_losses(work / "runs" / "single"))
    assert max(diffs.values()) < tr.LOSS_RTOL, diffs


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.distributed.tp=4", "tp 4 = 4, but the world size is 2"),
        ("model.num_heads=1", "num_heads 1"),
    ],
)
def test_layout_errors_stop_both_ranks(work: Path, override: str, message: str) -> None:
    done = tr.run(tensor_cmd(f"bad-{override.split('.')[-1]}", override), work, timeout=60)
    assert done.returncode == 2, done.output[-3000:]  # a config error, on both ranks
    assert done.output.count("config error: training.distributed: ") == 2
    assert message in done.output, done.output[-3000:]
