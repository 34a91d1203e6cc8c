"""Start the torchrun workers of the multi-process tests, and the checkpoint chain they run.

The checkpoints travel single -> FSDP x2 -> DDP x2 -> single:

    in-process single  --save-->  single_ckpt
    torchrun fsdp x2   --load single_ckpt, compare;  train 3 steps;  save fsdp_ckpt
    torchrun ddp  x2   --load fsdp_ckpt,   compare;  train 3 steps;  save ddp_ckpt
    in-process single  --load fsdp_ckpt and ddp_ckpt, compare
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import dist_worker

from apt.core.config.distributed import DistributedConfig
from apt.trainops.distributed import DistEnv, build_strategy

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
WORKER = HERE / "dist_worker.py"
LAUNCH_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def torchrun_cmd(
    *args: str, port: int, nnodes: int = 1, nproc: int = 2, node_rank: int = 0
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc}",
        f"--node-rank={node_rank}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "--max-restarts=0",
        str(WORKER),
        *args,
    ]


def run_checks(strategy: str, workdir: Path, backend: str, **ckpts: Path) -> dict:
    """One torchrun x2 of dist_worker.py in check mode; what rank 0 measured."""
    out = workdir / f"{strategy}.json"
    args = [
        "--strategy",
        strategy,
        "--backend",
        backend,
        "--workdir",
        str(workdir),
        "--out",
        str(out),
    ]
    for key, value in ckpts.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(
        torchrun_cmd(*args, port=free_port()),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
        env=worker_env(),
        cwd=ROOT,
    )
    assert proc.returncode == 0, (
        f"torchrun {strategy} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    )
    return json.loads(out.read_text())


def single_cross_load(**paths: Path | None) -> dict:
    """The worker's load/train/save step, in this process, with the single strategy (CPU)."""
    strategy = build_strategy(DistributedConfig(), env=DistEnv.single("cpu"))
    args = argparse.Namespace(
        **{k: paths.get(k) for k in ("load_ckpt", "load_ref", "save_ckpt", "save_ref")}
    )
    return dist_worker.cross_load(strategy, args)


def run_chain(work: Path, backend: str) -> dict:
    ck = {name: work / f"{name}_ckpt" for name in ("single", "fsdp", "ddp")}
    ref = {name: work / f"{name}_ref.pt" for name in ("single", "fsdp", "ddp")}
    single_cross_load(save_ckpt=ck["single"], save_ref=ref["single"])
    results = {
        "fsdp": run_checks(
            "fsdp",
            work,
            backend,
            load_ckpt=ck["single"],
            load_ref=ref["single"],
            save_ckpt=ck["fsdp"],
            save_ref=ref["fsdp"],
        )
    }
    results["ddp"] = run_checks(
        "ddp",
        work,
        backend,
        load_ckpt=ck["fsdp"],
        load_ref=ref["fsdp"],
        save_ckpt=ck["ddp"],
        save_ref=ref["ddp"],
    )
    results["fsdp->single"] = single_cross_load(load_ckpt=ck["fsdp"], load_ref=ref["fsdp"])
    results["ddp->single"] = single_cross_load(load_ckpt=ck["ddp"], load_ref=ref["ddp"])
    return results
