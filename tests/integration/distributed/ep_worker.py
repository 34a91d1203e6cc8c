"""One rank of the expert-parallel module test: an MoE layer whose experts are split over 2
ranks (``apply_ep``) against the same layer whole in this process, on this rank's tokens.

Writes ``<out>/rank<r>.json``: the largest differences of the output, the input gradient, the
router gradient and this rank's expert gradients from the whole layer's.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from apt.core.config.model import MoEConfig
from apt.model.layers.moe import MoEFeedForward
from apt.trainops.distributed.env import exit_process, teardown_distributed
from apt.trainops.distributed.expert_parallel import apply_ep


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    compare(args)
    dist.barrier()  # both ranks done with their collectives before the group goes
    gc.collect()  # the split layer's DTensors hold the mesh, and the mesh the group
    teardown_distributed()
    exit_process(0)  # as the CLI ends: gloo can abort in the interpreter's finalization


def compare(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same layer on every rank
    cfg = MoEConfig(enabled=True, num_experts=4, top_k=2, capacity_factor=args.capacity_factor)
    whole = MoEFeedForward(cfg, dim=16, hidden=32)
    with torch.no_grad():  # the model's init, done by APTModel, for the bare layer
        for param in whole.parameters():
            param.normal_(0.0, 0.2)
    split = copy.deepcopy(whole)
    apply_ep(split, ep_mesh=init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)))

    torch.manual_seed(100 + rank)  # each rank its own tokens; row 1 shorter (other C)
    batches = [torch.randn(2, 12, 16), torch.randn(1, 5 + 3 * rank, 16)]
    diffs: dict[str, float] = {}
    for step, x in enumerate(batches):
        x_whole, x_split = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_whole, aux_whole = whole(x_whole)
        y_split, aux_split = split(x_split)
        # What DDP-style averaging trains on: this rank's loss; the whole layer's expert
        # gradients of the ranks' mean loss are the sum over ranks / world.
        (y_whole.square().mean() + aux_whole.balance_loss).backward()
        (y_split.square().mean() + aux_split.balance_loss).backward()
        diffs[f"out{step}"] = float((y_whole - y_split).detach().abs().max())
        diffs[f"input_grad{step}"] = float((x_whole.grad - x_split.grad).abs().max())
    diffs["router_grad"] = float((whole.router.weight.grad - split.router.weight.grad).abs().max())
    local = cfg.num_experts // world
    for name in ("gate_proj", "up_proj", "down_proj"):
        full_grad = getattr(whole.experts, name).grad.clone()
        dist.all_reduce(full_grad)
        full_grad /= world  # the mean over ranks
        mine = full_grad[rank * local : (rank + 1) * local]
        got = getattr(split.experts, name).grad.to_local()
        diffs[f"expert_{name}"] = float((mine - got).abs().max() / mine.abs().max())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(diffs))


if __name__ == "__main__":
    main()
