"""FSDP2 on one GPU in a one-rank NCCL group: an async sharded save staged through pinned memory.

Run by test_sharded_gpu.py in its own process (it creates a process group). Trains 2 steps,
saves asynchronously while a third step updates every parameter on the GPU (the writer waits
for it), then checks the checkpoint against the state at save time, loads it into a fresh
FSDP model and repeats step 3. Prints one JSON line of what it found.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_workload as wl
import torch
import torch.distributed as dist

from apt.core.config.distributed import DistributedConfig
from apt.trainops.checkpoints import CheckpointManager, ShardedStatePayload
from apt.trainops.checkpoints.dcp import read_dcp_tensors
from apt.trainops.distributed import SideChannel, build_strategy, exit_process, setup_distributed


def main() -> None:
    save_dir = Path(sys.argv[1])
    dist.init_process_group(
        "nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0)
    )
    strategy = build_strategy(DistributedConfig(strategy="fsdp"), env=setup_distributed())
    model = strategy.apply(wl.make_model(0))
    opt = wl.make_optimizer(model)
    list(wl.train(model, opt, range(2), clip=strategy.clip_grad_norm_))
    side = SideChannel(60)
    step_done = threading.Event()  # the writer waits for it: it writes after step 3 ran

    def manager() -> CheckpointManager:
        return CheckpointManager(
            save_dir=save_dir,
            async_save=True,
            barrier=wl.held_barrier(side.barrier, step_done),
            payload=ShardedStatePayload(strategy, side.group),
        )

    saving = manager()
    at_save, _ = strategy.full_state_dict(model, None)
    saving.save(2, model=model, optimizer=opt)
    (loss3,) = wl.train(model, opt, range(2, 3), clip=strategy.clip_grad_norm_)
    after, _ = strategy.full_state_dict(model, None)
    step_done.set()
    saving.wait()
    on_disk = read_dcp_tensors(save_dir / "step-000000002" / "model")

    fresh = strategy.apply(wl.make_model(1))
    fresh_opt = wl.make_optimizer(fresh)
    manager().load(2, model=fresh, optimizer=fresh_opt)
    (again3,) = wl.train(fresh, fresh_opt, range(2, 3), clip=strategy.clip_grad_norm_)
    params = [p for p in model.parameters()]
    result = {
        "sharded": all(type(p).__name__ == "DTensor" for p in params),
        "device": str(params[0].device),
        "saved_equals_state_at_save": all(torch.equal(on_disk[k], at_save[k]) for k in at_save),
        "step3_changed_every_weight": all(
            not torch.equal(after[k], at_save[k]) for k in at_save if k.endswith("weight")
        ),
        "loss3": loss3,
        "loss3_after_load": again3,
    }
    print(json.dumps(result))
    dist.destroy_process_group()
    exit_process(0)  # gloo can abort in finalization (see exit_process)


if __name__ == "__main__":
    main()
