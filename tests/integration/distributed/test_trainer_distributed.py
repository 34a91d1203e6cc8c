"""The whole Trainer under torchrun, through the real CLI (issue 5, section 5).

Two processes, gloo, CPU. Every run is ``python -m apt train`` or ``python -m apt launch ...
train`` on cpu/tiny (see trainer_runs.BASE), all in one working folder; the tests read what a
user would: ``runs/<name>/metrics.jsonl``, checkpoints, ``final_model/``, exit codes and
messages. Runs that several tests read are module fixtures, so each launch happens once
(about 20 launches, ~95 s on 2 cores).

Global batch everywhere: 8 sequences per optimizer step (1 process x 8, or 2 ranks x 4).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import trainer_runs as tr

from apt import load_profile
from apt.trainops.data.sampler import ResumableSampler

pytestmark = pytest.mark.distributed

# ---- tolerances ---------------------------------------------------------------------------
# 2 ranks vs 1 process on the same global batch: fp32, the same kernels and the same samples
# in each step (test_two_ranks_read_the_steps_of_one_process); only the order of the sums
# differs (two half-batch means, then an all-reduce). That is a few ulps per op, ~1e-7
# relative. Measured, max over the 20 steps: 2.1e-7 for DDP, FSDP, the two-node run and both
# resharding chains (checkpoints in between change nothing). 1e-5 leaves a 50x margin and still
# fails on any real error: a missing 1/world factor, a skipped gradient sync, a sample read
# twice or a lost optimizer state moves the loss by >1e-3 within a step or two.
LOSS_RTOL = 1e-5
# Weights after 20 steps, max over tensors of |w - w_ref| / |w_ref|: measured 3.1e-6. Adam
# divides each update by sqrt(v), so a parameter whose gradient is round-off-sized gets an
# O(lr) update whose sign is noise; one process does that to itself when it averages two
# half-batch gradients instead of one (test_dist_multiprocess.py measured 2.2e-5). Hence 1e-4.
WEIGHT_RTOL = 1e-4
FAULT_TIMEOUT_S = 5  # training.distributed.timeout_seconds of the fault runs


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trainer_dist")


@pytest.fixture(scope="module")
def single(work: Path) -> tr.Finished:
    """The reference: one process, 20 steps, batch 8."""
    return tr.run(tr.single_cmd("single"), work).check()


@pytest.fixture(scope="module")
def ddp(work: Path) -> tr.Finished:
    """DDP x2, 20 steps, batch 4 per rank; also the uninterrupted twin of the SIGKILL test
    (the same command; its fault hook is not armed)."""
    return tr.run(tr.launch_cmd("ddp", "ddp", tr.FAULT_HOOK), work).check()


@pytest.fixture(scope="module")
def fsdp(work: Path) -> tr.Finished:
    return tr.run(tr.launch_cmd("fsdp", "fsdp"), work).check()


# ---- 1. DDP / FSDP against one process on the same global batch ---------------------------
def test_two_ranks_read_the_steps_of_one_process() -> None:
    """Rank r takes every 2nd index of the epoch's permutation from position r, so step k of
    2 ranks x B reads positions [2Bk, 2B(k+1)): the samples of step k of 1 process x 2B, in
    another order inside the step. Epochs have as many steps, also for an odd dataset size."""
    cfg = load_profile("cpu/tiny", overrides=list(tr.BASE))
    n, b = tr.tiny_train_size(), tr.GLOBAL_BATCH
    assert n % 2 == 1  # the case where dropping the tail could differ

    def order(rank: int, world: int, epoch: int) -> list[int]:
        sampler = ResumableSampler(
            n, shuffle=cfg.data.shuffle, seed=cfg.training.seed, rank=rank, world_size=world
        )
        return sampler.epoch_indices(epoch)

    for epoch in (0, 1):
        one = order(0, 1, epoch)
        r0, r1 = order(0, 2, epoch), order(1, 2, epoch)
        assert len(one) // b == len(r0) // (b // 2) == len(r1) // (b // 2) == n // b
        h = b // 2
        for k in range(n // b):
            two = r0[k * h : (k + 1) * h] + r1[k * h : (k + 1) * h]
            assert sorted(two) == sorted(one[k * b : (k + 1) * b]), (epoch, k)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_twenty_steps_match_one_process(
    request: pytest.FixtureRequest, single: tr.Finished, work: Path, strategy: str
) -> None:
    request.getfixturevalue(strategy)
    ref = tr.train_losses(work / "runs" / "single")
    got = tr.train_losses(work / "runs" / strategy)
    assert sorted(ref) == list(range(1, 21))
    diffs = tr.loss_rel_diffs(got, ref)
    assert max(diffs.values()) < LOSS_RTOL, diffs
    assert got[20] < got[1] - 1.0  # it trains (5.4 -> ~3.7)
    ref_w = tr.final_weights(work / "runs" / "single")
    got_w = tr.final_weights(work / "runs" / strategy)
    assert tr.max_rel_diff({k: got_w[k] for k in ref_w}, ref_w) < WEIGHT_RTOL


def test_metrics_are_reduced_over_ranks_and_written_once_by_rank_0(
    single: tr.Finished, ddp: tr.Finished, work: Path
) -> None:
    ref = {r["step"]: r for r in tr.records(work / "runs" / "single") if "train_loss" in r}
    got = [r for r in tr.records(work / "runs" / "ddp") if "train_loss" in r]
    assert [r["step"] for r in got] == list(range(1, 21))  # one writer: each step once
    for record in got:
        step = record["step"]
        assert record["tokens_seen"] == ref[step]["tokens_seen"], step  # summed over ranks
        assert record["step_time"] > 0 and record["tokens_per_second"] > 0
        assert record["peak_memory_gib"] > 0
    evals = {r["step"]: r for r in tr.records(work / "runs" / "ddp") if "val_bpb" in r}
    ref_evals = {r["step"]: r for r in tr.records(work / "runs" / "single") if "val_bpb" in r}
    assert sorted(evals) == sorted(ref_evals) and evals
    for step, record in evals.items():  # every validation target counted once over ranks
        assert record["val_bpb"] == pytest.approx(ref_evals[step]["val_bpb"], rel=LOSS_RTOL)
        assert record["best_val_loss"] == pytest.approx(
            ref_evals[step]["best_val_loss"], rel=LOSS_RTOL
        )


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_final_model_holds_the_tensors_of_one_process(
    request: pytest.FixtureRequest, single: tr.Finished, work: Path, strategy: str
) -> None:
    request.getfixturevalue(strategy)
    got = tr.final_weights(work / "runs" / strategy)
    assert sorted(got) == sorted(tr.final_weights(work / "runs" / "single"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_validation_at_step_0_matches_one_process(
    request: pytest.FixtureRequest, single: tr.Finished, work: Path, strategy: str
) -> None:
    """Same initial weights, same 5 validation sequences: the same val_loss."""
    request.getfixturevalue(strategy)
    ref = tr.val_losses(work / "runs" / "single")[0]
    got = tr.val_losses(work / "runs" / strategy)[0]
    assert abs(got - ref) / ref < LOSS_RTOL, (got, ref)


# ---- 2. SIGKILL of the whole job, then the same command -----------------------------------
@pytest.fixture(scope="module")
def killed(work: Path, ddp: tr.Finished) -> dict:
    """The DDP command; rank 0 stops after step 12 (checkpoint 10 is committed); SIGKILL to
    the launcher's process group, then to every worker left; the same command again."""
    marker = work / "killed.marker"
    cmd = tr.launch_cmd("killed", "ddp", tr.FAULT_HOOK)
    proc = tr.start(cmd, work, APT_TEST_FAULT="pause:0@12", APT_TEST_FAULT_MARKER=str(marker))
    tr.wait_for(marker, proc, timeout=tr.RUN_TIMEOUT_S)
    workers = tr.descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's whole process group
        proc.wait(timeout=30)  # not communicate(): surviving workers still hold its stdout
        time.sleep(1.0)
        orphans = [pid for pid in workers if tr.alive(pid)]
    finally:
        for pid in workers:  # the job is dead: end what the group kill did not reach
            tr.kill_tree(pid)
        deadline = time.monotonic() + 10
        while any(tr.alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
    proc.communicate(timeout=30)
    run_dir = work / "runs" / "killed"
    after_kill = {
        "latest": tr.latest(run_dir),
        "final_model": (run_dir / "final_model").exists(),
        "steps": tr.logged_steps(run_dir),
    }
    rerun = tr.run(cmd, work).check()
    return {"workers": workers, "orphans": orphans, "after_kill": after_kill, "rerun": rerun}


def test_sigkill_then_same_command_ends_bitwise_equal(killed: dict, work: Path) -> None:
    run_dir, ref_dir = work / "runs" / "killed", work / "runs" / "ddp"
    before = killed["after_kill"].pop("steps")  # 1..11 or 1..12: the hook may run before
    assert before in (list(range(1, 12)), list(range(1, 13)))  # or after the metrics logger
    assert killed["after_kill"] == {"latest": "step-000000010", "final_model": False}
    assert "resumed from" in killed["rerun"].output and "step 10)" in killed["rerun"].output
    # metrics.jsonl: the resumed run kept the lines up to its checkpoint (step 10) and logged
    # 11, 12 ... again: each step once
    assert tr.logged_steps(run_dir) == list(range(1, 21))
    got, ref = tr.final_weights(run_dir), tr.final_weights(ref_dir)
    assert tr.bitwise_equal(got, ref), tr.max_rel_diff(got, ref)
    assert tr.train_losses(run_dir) == tr.train_losses(ref_dir)  # exactly


def test_sigkill_of_the_launcher_group_ends_its_workers(killed: dict) -> None:
    assert len(killed["workers"]) == 2
    assert killed["orphans"] == [], "workers alive 1 s after the launcher group was killed"


def test_elastic_restart_resumes_and_ends_equal(work: Path, ddp: tr.Finished) -> None:
    """`launch --max-restarts 1`: rank 1 crashes after step 12 (checkpoint at 10); torchrun
    restarts both workers, they resume from step 10 by themselves and the run ends as the
    uninterrupted one did."""
    cmd = tr.launch_cmd("elastic", "ddp", tr.FAULT_HOOK, launch_flags=("--max-restarts=1",))
    done = tr.run(cmd, work, APT_TEST_FAULT="die:1@12").check()
    out = done.output[-6000:]
    assert "FAULT-HOOK rank 1: die after step 12" in done.output, out
    assert "resumed from" in done.output and "step 10)" in done.output, out
    run_dir, ref_dir = work / "runs" / "elastic", work / "runs" / "ddp"
    assert tr.logged_steps(run_dir) == list(range(1, 21)), out  # 11, 12 logged once, again
    got, ref = tr.final_weights(run_dir), tr.final_weights(ref_dir)
    assert tr.bitwise_equal(got, ref), tr.max_rel_diff(got, ref)
    assert tr.train_losses(run_dir) == tr.train_losses(ref_dir)


def test_keyword_trainer_with_distributed_config(work: Path) -> None:
    """`Trainer(model=m, train_dataset=d, distributed_config={'strategy': 'fsdp'})` under
    torchrun: the user's own model is sharded, trains, and checkpoints as DCP shards."""
    worker = tr.HERE / "keyword_trainer_worker.py"
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"),
        *("--master-addr=127.0.0.1", f"--master-port={tr.free_port()}", str(worker)),
        str(work / "keywords"),
    ]
    done = tr.run(cmd, work).check()
    got = json.loads(done.output.strip().splitlines()[-1])
    assert (got["world_size"], got["strategy"], got["sharded"]) == (2, "fsdp", True)
    assert got["global_step"] == 30
    assert got["last_loss"] < got["first_loss"] - 1.0
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(got["checkpoint"])


# ---- 3. resharding resume through the Trainer ---------------------------------------------
# The global batch stays 8 across a change of world size (batch_size 4 on 2 ranks, 8 on 1),
# so each chain is the 20-step run `single` and the data cursor (micro-batches per rank x
# batch_size) points at the same sample. --allow-config-change: the world size and
# training.batch_size are resume-critical.
CHAINS = {
    "fsdp2-single-ddp2": [("fsdp", 10), ("single", 15), ("ddp", 20)],
    "single-fsdp2": [("single", 10), ("fsdp", 20)],
}


def _segment_cmd(name: str, kind: str, steps: int, dump: Path, first: bool) -> list[str]:
    sets = (f"training.max_steps={steps}", tr.loaded_weights_hook(dump))
    flags = () if first else ("--allow-config-change",)
    if kind == "single":
        return tr.single_cmd(name, *sets, flags=flags)
    return tr.launch_cmd(name, kind, *sets, flags=flags)


@pytest.fixture(scope="module")
def chains(work: Path) -> dict:
    """Each chain in one run folder; after each hop what was loaded and what had been saved.

    The FSDP x2 folder at step 10 is also copied to ``runs/fewer-ranks`` (see below)."""
    out: dict = {}
    for name, segments in CHAINS.items():
        run_dir = work / "runs" / name
        saved: list = []  # (step, checkpoint weights, final_model weights) per segment
        formats: list = []  # (strategy, files of its last checkpoint) per segment
        hops = []
        for i, (kind, steps) in enumerate(segments):
            dump = work / f"{name}-{i}.loaded.safetensors"
            done = tr.run(_segment_cmd(name, kind, steps, dump, first=i == 0), work).check()
            if i:
                loaded = tr.read_weights(dump) if dump.exists() else None
                hops.append({"output": done.output, "loaded": loaded, "saved": saved[-1]})
            elif kind == "fsdp":
                shutil.copytree(run_dir, work / "runs" / "fewer-ranks")
            saved.append((steps, tr.checkpoint_weights(run_dir, steps), tr.final_weights(run_dir)))
            formats.append((kind, tr.checkpoint_files(run_dir, steps)))
        out[name] = {"run_dir": run_dir, "hops": hops, "formats": formats}
    return out


def test_fsdp_saves_shards_with_dcp_and_the_others_a_gathered_state(chains: dict) -> None:
    """FSDP: each rank's DCP shard in model/ and optim/, no gathered copy; DDP and one process:
    the gathered safetensors. Every file is in the manifest either way."""
    sharded = {"model/.metadata", "model/__0_0.distcp", "model/__1_0.distcp", "optim/.metadata"}
    sharded |= {"optim/__0_0.distcp", "optim/__1_0.distcp"}
    gathered = {"model/model.safetensors", "optim/optimizer.pt", "optim/optimizer.safetensors"}
    seen = set()
    for chain in chains.values():
        for kind, files in chain["formats"]:
            assert {"rng/rank-00000.json", "trainer_state.json"} <= files
            if kind == "fsdp":
                assert sharded <= files and not files & gathered, sorted(files)
            else:
                assert gathered <= files and not any(f.endswith(".distcp") for f in files)
            seen.add(kind)
    assert seen == {"fsdp", "ddp", "single"}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_resharding_resume_loads_the_saved_weights(chains: dict, chain: str) -> None:
    for hop in chains[chain]["hops"]:
        step, ckpt, exported = hop["saved"]
        assert "resumed from" in hop["output"] and f"step {step})" in hop["output"]
        assert "world size: " in hop["output"]  # the change was noticed, and allowed
        assert hop["loaded"] is not None, "the resume did not fire checkpoint_load"
        assert tr.bitwise_equal(hop["loaded"], ckpt), tr.max_rel_diff(hop["loaded"], ckpt)
        assert tr.bitwise_equal({k: hop["loaded"][k] for k in exported}, exported)


@pytest.mark.parametrize("chain", list(CHAINS))
def test_resharding_resume_continues_the_same_run(
    chains: dict, single: tr.Finished, work: Path, chain: str
) -> None:
    run_dir = chains[chain]["run_dir"]
    assert tr.logged_steps(run_dir) == list(range(1, 21))  # each hop starts at the saved step
    got = tr.train_losses(run_dir)
    assert all(math.isfinite(x) for x in got.values())
    assert got[20] < got[1] - 1.0
    diffs = tr.loss_rel_diffs(got, tr.train_losses(work / "runs" / "single"))
    assert max(diffs.values()) < LOSS_RTOL, diffs
    ref_w = tr.final_weights(work / "runs" / "single")
    got_w = tr.final_weights(run_dir)
    assert tr.max_rel_diff({k: got_w[k] for k in ref_w}, ref_w) < WEIGHT_RTOL


def test_resume_on_fewer_ranks_reads_each_sample_once_per_epoch(
    chains: dict, single: tr.Finished, work: Path
) -> None:
    """FSDP x2 (4 per rank) stopped at step 10, resumed by the same command in 1 process (the
    elastic case: a node is gone): epoch 0 must not hold more sequences than the dataset."""
    cmd = tr.single_cmd("fewer-ranks", "training.batch_size=4", flags=("--allow-config-change",))
    tr.run(cmd, work).check()
    records = [r for r in tr.records(work / "runs" / "fewer-ranks") if "train_loss" in r]
    per_seq = tr.records(work / "runs" / "single")[1]["tokens_seen"] / tr.GLOBAL_BATCH
    assert records[-1]["step"] == 20 and records[9]["step"] == 10
    seen_in_epoch0 = max(r["tokens_seen"] for r in records if r["epoch"] == 0) / per_seq
    assert seen_in_epoch0 <= tr.tiny_train_size(), f"{seen_in_epoch0:.0f} sequences in epoch 0"


# ---- 4. two "nodes" on one machine --------------------------------------------------------
@pytest.fixture(scope="module")
def multinode(work: Path, ddp: tr.Finished) -> list[tr.Finished]:
    """Two `apt launch --nnodes 2 --node-rank R --nproc-per-node 1`, started together, one cwd."""
    port = tr.free_port()
    started = time.monotonic()
    procs = [
        tr.start(
            tr.launch_cmd("multinode", "ddp", tr.FAULT_HOOK, port=port, nnodes=2, node_rank=r),
            work,
        )
        for r in (0, 1)
    ]
    return [tr.finish(p, started) for p in procs]


def test_two_nodes_over_loopback_equal_one_node(multinode: list[tr.Finished], work: Path) -> None:
    for node in multinode:
        node.check()
    run_dir, ref_dir = work / "runs" / "multinode", work / "runs" / "ddp"
    assert tr.latest(run_dir) == "step-000000020"
    rng = sorted(p.name for p in (run_dir / "checkpoints" / "step-000000020" / "rng").iterdir())
    assert rng == [  # the ranks of both nodes wrote into the one checkpoint
        "rank-00000.json",
        "rank-00000.safetensors",
        "rank-00001.json",
        "rank-00001.safetensors",
    ]
    assert tr.train_losses(run_dir) == tr.train_losses(ref_dir)  # exactly
    assert tr.bitwise_equal(tr.final_weights(run_dir), tr.final_weights(ref_dir))


# ---- 5. a rank that dies or hangs ---------------------------------------------------------
def _faulty_nodes(work: Path, name: str, fault: str) -> tuple[tr.Finished, float]:
    """Two one-rank "nodes" (so torchrun cannot stop rank 0 for us: it must notice by itself);
    rank 1 gets ``fault``. Returns node 0's result and its seconds from the fault to its exit."""
    marker = work / f"{name}.marker"
    port = tr.free_port()
    sets = (tr.FAULT_HOOK, f"training.distributed.timeout_seconds={FAULT_TIMEOUT_S}")
    started = time.monotonic()
    procs = [
        tr.start(
            tr.launch_cmd(name, "ddp", *sets, port=port, nnodes=2, node_rank=r),
            work,
            APT_TEST_FAULT=fault,
            APT_TEST_FAULT_MARKER=str(marker),
        )
        for r in (0, 1)
    ]
    try:
        tr.wait_for(marker, procs[0], timeout=tr.RUN_TIMEOUT_S)
        fault_at = time.monotonic()
        node0 = tr.finish(procs[0], started, timeout=FAULT_TIMEOUT_S + 60)
        return node0, time.monotonic() - fault_at
    finally:
        for proc in procs:  # a hung rank never ends by itself: end its node (ours)
            if proc.poll() is None:
                tr.kill_tree(proc.pid)
            proc.communicate(timeout=30)


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_lost_peer_ends_the_other_node_with_a_clear_error(work: Path, mode: str) -> None:
    node0, after = _faulty_nodes(work, f"lost-{mode}", f"{mode}:1@3")
    out = node0.output
    tail = out[-4000:]
    assert node0.returncode == 1, tail
    assert "error: rank 0 of 2: training (rank 0) failed because a peer rank stopped" in out, tail
    assert "timeout_seconds" in out  # the message says what to raise if ranks are only slow
    assert "error: training processes failed (rank 0: exit code 1)" in out
    if mode == "hang":
        assert "Timed out" in out
    # a dead peer is noticed at once (closed sockets), a hung one after the collective timeout
    limit = 15 if mode == "die" else FAULT_TIMEOUT_S + 15
    assert after < limit, f"node 0 took {after:.1f}s after the fault to exit"


def test_rank_that_dies_stops_a_single_node_launch(work: Path) -> None:
    """One torchrun, 2 ranks: rank 1 dies, rank 0 does not wait for it, and the launcher's
    summary names rank 1."""

    marker = work / "die-1node.marker"
    sets = (tr.FAULT_HOOK, f"training.distributed.timeout_seconds={FAULT_TIMEOUT_S}")
    started = time.monotonic()
    proc = tr.start(
        tr.launch_cmd("die-1node", "ddp", *sets),
        work,
        APT_TEST_FAULT="die:1@3",
        APT_TEST_FAULT_MARKER=str(marker),
    )
    done = tr.finish(proc, started, timeout=tr.RUN_TIMEOUT_S)
    assert marker.exists(), done.output[-4000:]
    assert done.returncode == 1, done.output[-4000:]
    summary = next(x for x in done.output.splitlines() if "training processes failed" in x)
    # rank 1 died; rank 0 ends by itself (exit 1, "peer stopped answering") or by torchrun
    assert "rank 1: exit code 1" in summary, summary
    assert done.seconds < 30


# ---- 6. a checkpoint save that fails on one rank -------------------------------------------
# Disk full (injected) while saving step 10, on the writer (rank 0) or on rank 1 only. The
# ranks agree on the outcome of every save, so both apply training.checkpoints.on_save_error
# the same way: `stop` ends both with the save error (not one with it and the other with "a
# peer stopped answering"), nothing of step 10 is committed, and the same command resumes
# from step 5 and ends equal to the uninterrupted DDP run. Two one-rank "nodes", so torchrun
# cannot stop the healthy rank for us.
def _two_nodes(work: Path, name: str, *sets: str, **env: str) -> list[tr.Finished]:
    port = tr.free_port()
    procs = [
        tr.start(tr.launch_cmd(name, "ddp", *sets, port=port, nnodes=2, node_rank=r), work, **env)
        for r in (0, 1)
    ]
    started = time.monotonic()
    return [tr.finish(proc, started) for proc in procs]


@pytest.fixture(scope="module", params=["writer", "other"])
def save_error_stop(request: pytest.FixtureRequest, work: Path, ddp: tr.Finished) -> dict:
    rank = {"writer": 0, "other": 1}[request.param]
    name = f"enospc-{request.param}"
    nodes = _two_nodes(work, name, tr.FAULT_HOOK, APT_FAULT_INJECT=f"enospc_on_write@10:{rank}")
    latest = tr.latest(work / "runs" / name)
    rerun = _two_nodes(work, name, tr.FAULT_HOOK)
    return {"nodes": nodes, "latest": latest, "rerun": rerun, "run_dir": work / "runs" / name}


def test_save_error_on_one_rank_stops_every_rank_with_it(save_error_stop: dict) -> None:
    for node in save_error_stop["nodes"]:
        out = node.output[-6000:]
        assert node.returncode == 1, out
        assert "the checkpoint of step 10" in out, out

        assert "on_save_error: stop" in out, out
        assert "stopped answering" not in out, out
    failed_elsewhere = [n for n in save_error_stop["nodes"] if "failed on another rank" in n.output]
    assert len(failed_elsewhere) == 1  # the healthy rank learned it from the agreement
    assert save_error_stop["latest"] == "step-000000005"


def test_save_error_then_same_command_ends_equal(save_error_stop: dict, work: Path) -> None:
    for node in save_error_stop["rerun"]:
        node.check()
    assert "resumed from" in save_error_stop["rerun"][0].output
    assert "step 5)" in save_error_stop["rerun"][0].output
    got, ref = tr.final_weights(save_error_stop["run_dir"]), tr.final_weights(work / "runs" / "ddp")
    assert tr.bitwise_equal(got, ref), tr.max_rel_diff(got, ref)


def test_save_error_with_continue_goes_on_on_every_rank(work: Path, ddp: tr.Finished) -> None:
    name = "enospc-continue"
    sets = (tr.FAULT_HOOK, "training.checkpoints.on_save_error=continue")
    nodes = _two_nodes(work, name, *sets, APT_FAULT_INJECT="enospc_on_write@10:1")
    for node in nodes:
        node.check()
    assert "checkpoint of step 10 failed, training goes on" in nodes[0].output
    run_dir = work / "runs" / name
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert kept == ["step-000000005", "step-000000015", "step-000000020"]
    got, ref = tr.final_weights(run_dir), tr.final_weights(work / "runs" / "ddp")
    assert tr.bitwise_equal(got, ref), tr.max_rel_diff(got, ref)


# ---- 7. a divergence that starts on one rank -------------------------------------------------
# Rank 0's weights turn NaN after step 7; the losses are summed over the ranks, so both ranks
# see the non-finite loss of step 8 and stop together with exit 3 (neither waits for the other),
# before the checkpoint of step 10: step 5 stays LATEST and the same command (without the
# fault) ends equal to the uninterrupted DDP run.
def test_a_nan_on_one_rank_stops_every_rank_and_keeps_the_finite_checkpoint(
    work: Path, ddp: tr.Finished
) -> None:
    name = "nan-rank0"
    nodes = _two_nodes(work, name, tr.FAULT_HOOK, APT_TEST_FAULT="nan:0@7")
    for node in nodes:
        out = node.output[-6000:]
        assert node.returncode == 3, out
        assert "step 8: the training loss is nan" in out, out
        assert "stopped answering" not in out, out
    assert tr.latest(work / "runs" / name) == "step-000000005"
    for node in _two_nodes(work, name, tr.FAULT_HOOK):
        node.check()
    got, ref = tr.final_weights(work / "runs" / name), tr.final_weights(work / "runs" / "ddp")
    assert tr.bitwise_equal(got, ref), tr.max_rel_diff(got, ref)
