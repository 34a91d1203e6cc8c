"""Checkpoint cost for a ~124M-parameter model with AdamW state.

Times, each repeated ``--repeats`` times (medians printed):

* sync save: ``CheckpointManager.save`` with ``async_save=False`` (write, sha256, fsync, manifest,
  rename, LATEST, retention);
* async blocking: how long ``save`` blocks the caller with ``async_save=True`` (the CPU snapshot);
  the first async save also allocates its snapshot buffers and is reported apart;
* async total: from ``save`` until the background commit is done;
* torch.save: a plain ``torch.save`` of the same model and optimizer state dicts (no checksums,
  no fsync, no atomic commit), and the same followed by an fsync.

With ``--sharded`` the model is FSDP2-sharded in a one-rank process group and saved through
``ShardedStatePayload`` (DCP shards, the Trainer's FSDP format); the baseline is then torch's
own ``torch.distributed.checkpoint.save`` of the same state.

Usage::

    python benchmarks/checkpoint.py [--repeats 5] [--dir /path/on/the/disk/to/test] \
        [--device cpu|cuda] [--sharded]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from apt.core.config import ModelConfig
from apt.core.config.distributed import DistributedConfig
from apt.model import build_model
from apt.trainops.checkpoints import CheckpointManager, Payload, ShardedStatePayload
from apt.trainops.distributed import SideChannel, Strategy, build_strategy, setup_distributed


def one_rank_fsdp(device: str) -> Strategy:
    """FSDP2 in a one-process group (nccl on CUDA, gloo on CPU)."""
    dist.init_process_group(
        "nccl" if device.startswith("cuda") else "gloo",
        store=dist.HashStore(),
        rank=0,
        world_size=1,
    )
    env = setup_distributed(device=device)
    return build_strategy(DistributedConfig(strategy="fsdp"), env=env)


def build(device: str, strategy: Strategy | None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The ``small`` APT model (GPT-2 small shape) with one AdamW step taken."""
    model = build_model(ModelConfig(preset="small", vocab_size=50304))
    model = strategy.apply(model) if strategy is not None else model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()  # creates exp_avg / exp_avg_sq
    return model, optimizer


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    os.sync()  # start each measurement with no dirty pages left by the previous one
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def torch_save(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, sync: bool) -> None:
    with open(path, "wb") as fh:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, fh)
        if sync:
            fh.flush()
            os.fsync(fh.fileno())


def dcp_save(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: Strategy, path: Path):
    model_sd, optim_sd = strategy.sharded_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sharded", action="store_true", help="FSDP2 + DCP shards (see above)")
    args = parser.parse_args()

    strategy = one_rank_fsdp(args.device) if args.sharded else None
    model, optimizer = build(args.device, strategy)
    params = sum(p.numel() for p in model.parameters())
    payload: Payload | None = None
    if strategy is not None:
        payload = ShardedStatePayload(strategy, SideChannel(600).group)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        sync = CheckpointManager(save_dir=root / "sync", keep_last_n=1, payload=payload)
        asyn = CheckpointManager(
            save_dir=root / "async", keep_last_n=1, async_save=True, payload=payload
        )
        os.sync()
        asyn.save(0, model=model, optimizer=optimizer)  # first: allocates snapshot buffers
        first_block = asyn.last_save_blocking_seconds or 0.0
        asyn.wait()
        rows: dict[str, list[float]] = {
            k: [] for k in ("sync", "async_block", "async_total", "torch", "torch_f")
        }
        for i in range(1, args.repeats + 1):
            rows["sync"].append(timed(lambda i=i: sync.save(i, model=model, optimizer=optimizer)))
            os.sync()
            asyn.save(i, model=model, optimizer=optimizer)
            rows["async_block"].append(asyn.last_save_blocking_seconds or 0.0)
            asyn.wait()
            assert asyn.last_save is not None
            rows["async_total"].append(asyn.last_save.total_seconds)
            if strategy is not None:  # DCP's writer fsyncs every file: no separate variant
                rows["torch"].append(
                    timed(lambda i=i: dcp_save(model, optimizer, strategy, root / f"d{i}"))
                )
                rows["torch_f"].append(rows["torch"][-1])
                continue
            rows["torch"].append(timed(lambda: torch_save(model, optimizer, root / "t.pt", False)))
            rows["torch_f"].append(timed(lambda: torch_save(model, optimizer, root / "t.pt", True)))
        size = sync.last_save.bytes_written if sync.last_save else 0
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(
        f"model: {params / 1e6:.1f}M parameters, checkpoint {size / 2**30:.2f} GiB, "
        f"device {args.device}, {'FSDP2 + DCP shards, ' if args.sharded else ''}"
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"{args.repeats} repeats (medians)"
    )
    print(f"  sync save                 {med['sync']:7.3f} s")
    print(
        f"  async save, blocking      {med['async_block']:7.3f} s   "
        f"(first save, allocating buffers: {first_block:.3f} s)"
    )
    print(f"  async save, until commit  {med['async_total']:7.3f} s")
    base = "dcp.save" if args.sharded else "torch.save"
    print(f"  {base:<25} {med['torch']:7.3f} s   (+ fsync: {med['torch_f']:.3f} s)")
    print(f"  async blocking / sync     {med['async_block'] / med['sync']:7.1%}")
    print(
        f"  sync / {base:<18} {med['sync'] / med['torch']:7.2f}x   "
        f"(vs torch.save + fsync: {med['sync'] / med['torch_f']:.2f}x)"
    )


if __name__ == "__main__":
    main()
