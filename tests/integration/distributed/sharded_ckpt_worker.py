"""One rank of test_sharded_checkpoints.py, started by torchrun (2 ranks, gloo, FSDP2).

Trains the tiny model, saving through CheckpointManager + ShardedStatePayload at steps 2 and 4
(sync or async: with async the writer thread writes only once the next step has run). Rank 0 writes
the gathered full state at each save, and after step 6 the losses of steps 5-6, to --out; the
test compares the checkpoints against them. With --resume the ranks first load the newest good
checkpoint and train from there to step 6, and rank 0 writes those losses.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_workload as wl
from safetensors.torch import save_file

from apt.core.config.distributed import DistributedConfig
from apt.trainops.checkpoints import CheckpointManager, ShardedStatePayload
from apt.trainops.distributed import (
    SideChannel,
    all_reduce_mean,
    build_strategy,
    exit_process,
    setup_distributed,
    teardown_distributed,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--save-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    env = setup_distributed("gloo", timeout_seconds=60)
    strategy = build_strategy(DistributedConfig(strategy="fsdp"), env=env)
    model = strategy.apply(wl.make_model(0))
    opt = wl.make_optimizer(model)
    side = SideChannel(60)
    # An async save's writer thread waits at its first barrier until the next step has
    # changed every parameter: what it writes must be the state staged at save time.
    next_step_done = threading.Event()
    manager = CheckpointManager(
        save_dir=args.save_dir,
        is_writer=env.is_main,
        barrier=wl.held_barrier(side.barrier, next_step_done),
        rank=env.rank,
        world_size=env.world_size,
        payload=ShardedStatePayload(strategy, side.group),
        async_save=args.async_save,
    )
    start = 0
    if args.resume:
        loaded = manager.load_latest(model=model, optimizer=opt)
        start = loaded.step if loaded else 0
    losses = {}
    for step in range(start, 6):
        (loss,) = wl.train(
            model,
            opt,
            range(step, step + 1),
            rank=env.rank,
            world=env.world_size,
            clip=strategy.clip_grad_norm_,
            mean=all_reduce_mean,
        )
        losses[step + 1] = loss
        next_step_done.set()
        if args.resume or (step + 1) not in (2, 4):
            continue
        manager.wait()
        next_step_done.clear()
        manager.save(step + 1, model=model, optimizer=opt, trainer_state={"step": step + 1})
        full, _ = strategy.full_state_dict(model, None)
        if env.is_main:
            save_file(full, str(args.out.parent / f"full-{step + 1}.safetensors"))
    manager.close()
    if env.is_main:
        args.out.write_text(json.dumps({"start": start, "losses": losses}))
    teardown_distributed()
    exit_process(0)  # gloo can abort in finalization (see exit_process)


if __name__ == "__main__":
    main()
