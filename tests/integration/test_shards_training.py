"""Pre-training from a prepared shard folder, end to end: the loss falls, a SIGKILL mid-epoch
and the same command end bitwise equal to an uninterrupted run, two DDP ranks read disjoint
windows, and PreTrainer trains from a folder.

One shard folder for the module: standard-library text, byte tokenizer, 1,000-token shards, so
most 33-token windows lie in one shard and some span two. 4,300 training tokens at seq_len 32
are 134 windows: 16 steps of 8 per epoch, so a 20-step run crosses an epoch boundary.

Run as a script (``python -m torch.distributed.run ... test_shards_training.py FOLDER OUT``),
this file is also the worker of the DDP test.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE / "distributed"), str(HERE.parent / "helpers")]

import trainer_runs as tr  # noqa: E402
from shard_folder import ShardFolder, stdlib_texts, write_shard_folder  # noqa: E402

from apt import load_profile  # noqa: E402
from apt.core.config.data import ShardSource  # noqa: E402
from apt.trainops.data import ShardDataset  # noqa: E402
from apt.trainops.data.sampler import ResumableSampler  # noqa: E402
from apt.trainops.engine import PreTrainer, Trainer  # noqa: E402

PROFILE = "cpu/pretrain_tiny"
SEQ = 32
CLI_SETS = (
    "training.deterministic=true",
    "training.max_steps=20",
    "training.checkpoints.save_interval=5",
    "eval.interval=10",
    "monitoring.log_interval=1",
    "artifacts.output_dir=runs",
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> ShardFolder:
    texts = {"train": stdlib_texts(4300), "val": stdlib_texts(700, skip_bytes=4300)}
    return write_shard_folder(tmp_path_factory.mktemp("data") / "shards", texts, shard_tokens=1000)


def windows(made: ShardFolder, split: str = "train") -> np.ndarray:
    """Every window's input_ids, cut from the stream the writer made: (N, SEQ)."""
    stream = made.streams[split]
    n = (len(stream) - 1) // SEQ
    return np.stack([stream[i * SEQ : i * SEQ + SEQ] for i in range(n)])


def test_a_tiny_model_pretrains_from_shards_and_validation_loss_falls(
    shards: ShardFolder, tmp_path: Path
) -> None:
    cfg = load_profile(
        PROFILE,
        overrides=[f"data.source.path={shards.path}", f"artifacts.output_dir={tmp_path}"],
    )
    trainer = Trainer.from_config(cfg)
    assert isinstance(trainer.train_loader.dataset, ShardDataset)
    assert len(trainer.train_loader.dataset) == len(windows(shards)) == 134
    result = trainer.train()
    m = result.metrics
    assert result.global_step == 20
    assert m["val_loss_final"] < m["val_loss_initial"] - 1.0, m  # 5.5 -> ~3.5
    assert np.isfinite(m["val_bpb"])


def _cli(name: str, folder: Path) -> list[str]:
    """``python -m apt train`` of the shard profile into ``runs/<name>``, the fault hook
    installed (it does nothing unless APT_TEST_FAULT arms it)."""
    sets = [*CLI_SETS, f"data.source.path={folder}", f"artifacts.experiment_name={name}"]
    sets.append(tr.FAULT_HOOK)
    args = [arg for s in sets for arg in ("--set", s)]
    return [sys.executable, "-m", "apt", "train", "--profile", PROFILE, *args]


@pytest.mark.faults
def test_sigkill_mid_epoch_then_the_same_command_ends_bitwise_equal(
    shards: ShardFolder, tmp_path: Path
) -> None:
    """The killed run pauses after step 12 (checkpoint 10 committed, epoch 0 has 16 steps) and
    is SIGKILLed; the same command resumes at step 10, mid-epoch, from the checkpointed data
    cursor, and ends as the run that was never interrupted (started alongside it)."""
    marker = tmp_path / "paused.marker"
    started = time.monotonic()
    golden = tr.start(_cli("golden", shards.path), tmp_path)
    killed = tr.start(
        _cli("killed", shards.path),
        tmp_path,
        APT_TEST_FAULT="pause:0@12",
        APT_TEST_FAULT_MARKER=str(marker),
    )
    try:
        tr.wait_for(marker, killed, timeout=tr.RUN_TIMEOUT_S)
        os.killpg(killed.pid, signal.SIGKILL)
        killed.communicate(timeout=30)
    finally:
        tr.kill_tree(killed.pid)
    assert killed.returncode == -signal.SIGKILL
    tr.finish(golden, started).check()
    run_dir, ref_dir = tmp_path / "runs" / "killed", tmp_path / "runs" / "golden"
    assert tr.latest(run_dir) == "step-000000010"
    rerun = tr.run(_cli("killed", shards.path), tmp_path).check()
    assert "resumed from" in rerun.output and "step 10)" in rerun.output, rerun.output[-3000:]
    assert tr.logged_steps(run_dir)[-10:] == list(range(11, 21))
    assert tr.train_losses(run_dir) == tr.train_losses(ref_dir)  # exactly
    got, ref = tr.final_weights(run_dir), tr.final_weights(ref_dir)
    assert tr.bitwise_equal(got, ref), tr.max_rel_diff(got, ref)
    val = tr.val_losses(ref_dir)
    assert val[20] < val[0] - 1.0, val  # the validation split of the folder, falling


@pytest.mark.distributed
def test_two_ddp_ranks_read_disjoint_windows_of_the_shards(
    shards: ShardFolder, tmp_path: Path
) -> None:
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"),
        *("--master-addr=127.0.0.1", f"--master-port={tr.free_port()}", __file__),
        *(str(shards.path), str(tmp_path)),
    ]
    tr.run(cmd, tmp_path).check()
    every = windows(shards)
    seen = {}
    for rank in (0, 1):
        order = ResumableSampler(len(every), shuffle=True, seed=42, rank=rank, world_size=2)
        got = np.load(tmp_path / f"rank{rank}.npy")  # 16 batches of 4: 64 of its 67
        indices = order.epoch_indices(0)
        assert len(indices) == 67 and len(got) == 64
        assert np.array_equal(got, every[indices[:64]]), f"rank {rank} read other windows"
        seen[rank] = set(indices)
        done = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert done["global_step"] == 3 and np.isfinite(done["train_loss"])
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == len(every) // 2 * 2  # 134: nothing dropped, none twice


def test_pretrainer_trains_from_a_shard_folder(shards: ShardFolder, tmp_path: Path) -> None:
    cfg = load_profile("cpu/tiny", overrides=[f"artifacts.output_dir={tmp_path}"])
    trainer = PreTrainer(data_path=shards.path, config=cfg, max_steps=12)
    source = trainer.config.data.source
    assert isinstance(source, ShardSource) and source.path == str(shards.path)
    assert trainer.config.data.max_corpus_bytes is None  # cpu/tiny's text cap is dropped
    result = trainer.pretrain()
    assert result.global_step == 12
    assert result.metrics["val_loss_final"] < result.metrics["val_loss_initial"] - 0.5


def test_pretrainer_with_keywords_only(shards: ShardFolder, tmp_path: Path) -> None:
    """No config: the schema's defaults under PreTrainer's own (learning rate, run name)."""
    torch.manual_seed(0)
    trainer = PreTrainer(
        data_path=shards.path, max_steps=2, batch_size=4, device="cpu", output_dir=str(tmp_path)
    )
    assert trainer.config.training.learning_rate == 6e-4
    assert trainer.run_dir == tmp_path / "pretrain"
    assert trainer.pretrain().global_step == 2


def test_a_missing_folder_fails_when_the_run_starts(tmp_path: Path) -> None:
    from apt.core.errors import DataError

    cfg = load_profile(PROFILE, overrides=[f"artifacts.output_dir={tmp_path}"])  # data/shards
    with pytest.raises(
        DataError,
        match=r"data.source.path: data/shards is not a folder of "
        r"prepared shards. Make one with `python -m apt data prepare",
    ):
        Trainer.from_config(cfg)


def _ddp_worker(folder: str, out: str) -> None:
    """One rank of the DDP test: read this rank's epoch 0 through the Trainer's own loader,
    then train 3 steps."""
    from apt.trainops.distributed import exit_process, teardown_distributed

    cfg = load_profile(
        PROFILE,
        overrides=[
            f"data.source.path={folder}",
            "training.distributed={strategy: ddp, backend: gloo}",
            "training.batch_size=4",
            "training.max_steps=3",
            "training.seed=42",
            f"artifacts.output_dir={out}",
        ],
    )
    trainer = Trainer.from_config(cfg)
    rank = trainer.env.rank
    trainer.train_loader.sampler.set_epoch(0)
    rows = torch.cat([batch["input_ids"] for batch in trainer.train_loader])
    np.save(Path(out) / f"rank{rank}.npy", rows.numpy())
    result = trainer.train()
    done = {"global_step": result.global_step, "train_loss": result.metrics["train_loss"]}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(done))
    teardown_distributed()
    exit_process(0)


if __name__ == "__main__":
    _ddp_worker(*sys.argv[1:3])
