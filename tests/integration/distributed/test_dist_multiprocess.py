"""DDP and FSDP2 on 2 real processes (torchrun, gloo, CPU), against one process.

Few launches, many checks: one torchrun run per strategy runs the whole strategy contract, the
20-step equivalence, a MoE model and a DCP cross-load, and writes what it measured to JSON; the
tests below read it (the checkpoint chain is in dist_launch.py). Two more launches, as two
one-process "nodes" so that torchrun cannot kill rank 0 for us, check that rank 0 ends with a
DistributedError when rank 1 dies or hangs.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import dist_contract
import pytest
from dist_launch import ROOT, free_port, run_chain, torchrun_cmd, worker_env

pytestmark = pytest.mark.distributed

FAULT_TIMEOUT_S = 5  # the collective timeout rank 0 runs with in the fault tests

# 20 AdamW steps of a tiny APTModel, 2 ranks vs 1 process, same global batch. In fp32 only the
# order of the gradient sums differs (two half-batch means, then an all-reduce): a few ulps,
# ~1e-7 relative, per step. Measured max over the 20 steps (CPU, gloo): loss 4.6e-7 (fsdp) and
# 5.8e-7 (ddp). LOSS_RTOL = 1e-5 leaves a ~20x margin and still fails on any real error: a wrong
# 1/world factor or a skipped sync moves the loss by >1e-2 within a few steps.
# The weights drift further apart, 2.2e-5 (max over tensors of |dw| / |w|), and one process does
# the same to itself: averaging two half-batch gradients instead of one full-batch gradient
# already gives 2.2e-5. Adam divides each update by sqrt(v), so a parameter whose gradient is
# round-off-sized gets an O(lr) update whose sign is noise. Hence 1e-4 for the weights.
LOSS_RTOL = 1e-5
WEIGHT_RTOL = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_chain(tmp_path_factory.mktemp("dist"), "gloo")


@pytest.mark.parametrize("check", dist_contract.CONTRACT_CHECKS)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_contract_on_two_ranks(runs: dict, strategy: str, check: str) -> None:
    result = runs[strategy]["contract"][check]
    assert result["ok"], f"{strategy} x2 failed contract check {check}: {result}"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_twenty_steps_match_one_process(runs: dict, strategy: str) -> None:
    eq = runs[strategy]["equivalence"]
    assert len(eq["losses"]) == 20
    assert eq["losses"][-1] < eq["losses"][0]  # it trains
    assert eq["max_loss_rel_err"] < LOSS_RTOL, (eq["losses"], eq["ref_losses"])
    assert eq["max_weight_rel_err"] < WEIGHT_RTOL


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_moe_model_with_idle_experts_trains(runs: dict, strategy: str) -> None:
    moe = runs[strategy]["moe"]
    assert len(moe["losses"]) == 3 and all(math.isfinite(x) for x in moe["losses"])
    if strategy == "ddp":  # find_unused_parameters: null -> on, because the model has "moe"
        assert moe["find_unused_parameters"] is True


@pytest.mark.parametrize(
    ("run", "what"),
    [
        ("fsdp", "single -> fsdp x2"),
        ("ddp", "fsdp x2 -> ddp x2"),
        ("fsdp->single", "fsdp x2 -> single"),
        ("ddp->single", "ddp x2 -> single"),
    ],
)
def test_dcp_checkpoint_reshards(runs: dict, run: str, what: str) -> None:
    loaded = runs[run] if "->" in run else runs[run]["cross_load"]
    assert loaded["model_equal"], f"{what}: model weights differ after loading"
    assert loaded["optim_equal"], f"{what}: optimizer state differs after loading"


def test_sharded_save_lists_every_rank_file(runs: dict) -> None:
    names = sorted(
        Path(p).relative_to(Path(p).parents[1]).as_posix()
        for p in runs["ddp"]["cross_load"]["saved_files"]
    )
    assert names == [
        "model/.metadata",
        "model/__0_0.distcp",
        "model/__1_0.distcp",
        "optim/.metadata",
        "optim/__0_0.distcp",
        "optim/__1_0.distcp",
    ]


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_lost_peer_ends_rank0_with_clear_error(mode: str) -> None:
    """Rank 1 (its own torchrun "node") dies or hangs at step 3; rank 0 must stop by itself.

    A dead peer closes its sockets, so gloo fails at once; a hung one is only noticed by the
    collective timeout (FAULT_TIMEOUT_S).
    """
    port = free_port()
    args = ("--mode", mode, "--timeout", str(FAULT_TIMEOUT_S))
    nodes = [
        subprocess.Popen(
            torchrun_cmd(*args, port=port, nnodes=2, nproc=1, node_rank=i),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=worker_env(),
            cwd=ROOT,
            start_new_session=True,
        )
        for i in (0, 1)
    ]
    start = time.monotonic()
    try:
        out0, _ = nodes[0].communicate(timeout=FAULT_TIMEOUT_S + 60)
        elapsed = time.monotonic() - start
    finally:
        for node in nodes:  # the hung rank never ends by itself: stop its torchrun (ours)
            if node.poll() is None:
                os.killpg(node.pid, 15)
            node.communicate(timeout=30)
    assert nodes[0].returncode != 0, out0[-3000:]
    report = [line for line in out0.splitlines() if "FAULT-REPORT" in line]
    assert report, f"rank 0 did not report a DistributedError:\n{out0[-4000:]}"
    assert "rank 0 of 2" in report[0] and "peer rank stopped answering" in report[0]
    assert "timeout_seconds" in report[0]
    if mode == "hang":
        assert "Timed out" in report[0]
    assert elapsed < FAULT_TIMEOUT_S + 45, f"rank 0 took {elapsed:.0f}s to give up"


@pytest.mark.distributed
def test_launch_sets_the_workers_threads_so_torchrun_prints_no_banner(tmp_path: Path) -> None:
    env = {k: v for k, v in worker_env().items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run(
        [sys.executable, "-m", "apt", "launch", "--nproc-per-node", "2",
         f"--master-port={free_port()}", "train", "--profile", "cpu/ddp_tiny",
         "--set", "training.max_steps=2", "--set", "data.max_corpus_bytes=3500"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Setting OMP_NUM_THREADS" not in proc.stderr
