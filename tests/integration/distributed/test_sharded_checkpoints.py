"""Sharded (DCP) checkpoints inside the manifest protocol: 2 FSDP ranks on gloo, real torchrun.

The manager commits each rank's DCP shards with the same stage/manifest/rename protocol as a
gathered checkpoint; what the tests hold it to: the shards are the training state at the step
saved (also when an async save writes while training goes on), every file is in the manifest
with the hash it has on disk, one process reads the shards back without a process group, a
corrupted shard is caught by verification and the resume falls back to the previous checkpoint.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest
import torch
from dist_launch import free_port, worker_env
from safetensors.torch import load_file

from apt.core.config.distributed import DistributedConfig
from apt.trainops.checkpoints import CheckpointManager, ShardedStatePayload
from apt.trainops.checkpoints.dcp import read_dcp_tensors
from apt.trainops.checkpoints.fsio import hash_file
from apt.trainops.distributed import DistEnv, build_strategy

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
SHARDS = {f"{folder}/__{rank}_0.distcp" for folder in ("model", "optim") for rank in (0, 1)}


def _launch(save_dir: Path, out: Path, *flags: str) -> dict:
    cmd = [
        *("python", "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2"),
        *("--master-addr=127.0.0.1", f"--master-port={free_port()}", "--max-restarts=0"),
        str(HERE / "sharded_ckpt_worker.py"),
        *("--save-dir", str(save_dir), "--out", str(out), *flags),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(), timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module", params=["sync", "async"])
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp(f"sharded-{request.param}")
    flags = ("--async-save",) if request.param == "async" else ()
    result = _launch(work / "ckpt", work / "run.json", *flags)
    return {"work": work, "save_dir": work / "ckpt", "result": result}


def _step(save_dir: Path, step: int) -> Path:
    return save_dir / f"step-{step:09d}"


def test_shards_hold_the_state_of_the_step_saved(saved: dict) -> None:
    for step in (2, 4):
        want = load_file(str(saved["work"] / f"full-{step}.safetensors"))
        got = read_dcp_tensors(_step(saved["save_dir"], step) / "model")
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), f"step {step}"


def test_manifest_lists_every_shard_with_its_hash_on_disk(saved: dict) -> None:
    folder = _step(saved["save_dir"], 4)
    files = json.loads((folder / "MANIFEST.json").read_text())["files"]
    on_disk = {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != "MANIFEST.json"
    }
    assert set(files) == on_disk
    assert SHARDS | {"model/.metadata", "optim/.metadata", "rng/rank-00001.json"} <= on_disk
    assert "model/model.safetensors" not in on_disk  # no rank gathered the full state
    for rel, record in files.items():
        assert hash_file(folder / rel).sha256 == record["sha256"], rel


def test_one_process_loads_the_shards(saved: dict) -> None:
    import dist_workload as wl

    strategy = build_strategy(DistributedConfig(), env=DistEnv.single("cpu"))
    model, manager = wl.make_model(1), None
    opt = wl.make_optimizer(model)
    manager = CheckpointManager(save_dir=saved["save_dir"], payload=ShardedStatePayload(strategy))
    loaded = manager.load(4, model=model, optimizer=opt)
    assert loaded.trainer_state == {"step": 4}
    want = load_file(str(saved["work"] / "full-4.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], want[k]) for k in want)
    assert len(opt.state) == len(list(model.parameters()))

    assert all(float(s["step"]) == 4.0 for s in opt.state.values())


def test_resume_continues_the_run_exactly(saved: dict) -> None:
    """Two FSDP ranks resume from step 4 and train steps 5-6: the same losses, bit for bit."""
    resumed = _launch(saved["save_dir"], saved["work"] / "resumed.json", "--resume")
    assert resumed["start"] == 4
    assert resumed["losses"] == {k: saved["result"]["losses"][k] for k in ("5", "6")}


def test_corrupt_shard_falls_back_to_the_previous_checkpoint(
    saved: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    import dist_workload as wl

    save_dir = tmp_path / "ckpt"
    shutil.copytree(saved["save_dir"], save_dir)
    shard = _step(save_dir, 4) / "optim" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    strategy = build_strategy(DistributedConfig(), env=DistEnv.single("cpu"))
    model = wl.make_model(1)
    manager = CheckpointManager(save_dir=save_dir, payload=ShardedStatePayload(strategy))
    with caplog.at_level(logging.WARNING):
        loaded = manager.load_latest(model=model, optimizer=wl.make_optimizer(model))
    assert loaded is not None and loaded.step == 2
    assert "optim/__1_0.distcp: expected sha256" in caplog.text
    want = load_file(str(saved["work"] / "full-2.safetensors"))
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)


def test_plain_manager_names_the_sharded_format(saved: dict) -> None:
    import dist_workload as wl

    from apt.core.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"sharded \(DCP\) checkpoint.*ShardedStatePayload"):
        CheckpointManager(save_dir=saved["save_dir"]).load(4, model=wl.make_model(1))
