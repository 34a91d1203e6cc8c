"""One rank of the multi-process tests, started by torchrun (see test_dist_multiprocess.py).

Modes:
  check  run the strategy contract, the 20-step equivalence with one process, 3 steps of a MoE
         model, (optionally) load a DCP checkpoint another strategy/world size wrote, train 3
         steps and save one; on CUDA also FSDP with bf16 and with CPU offload. Rank 0 writes
         everything it measured to --out as JSON.
  die    ranks train with DDP; rank 1 calls os._exit(1) at step 3 (a crash).
  hang   as die, but rank 1 sleeps instead (a hung peer); rank 0 must hit the timeout.
  In both fault modes rank 0 prints the DistributedError it got and exits with code 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_contract
import dist_workload as wl
import torch

from apt.core.config.distributed import DistributedConfig, FSDPOptions
from apt.core.config.model import MoEConfig
from apt.core.errors import DistributedError
from apt.trainops.checkpoints.dcp import load_dcp, save_dcp
from apt.trainops.distributed import (
    Strategy,
    all_reduce_mean,
    build_strategy,
    distributed_errors,
    exit_process,
    setup_distributed,
    teardown_distributed,
)


def equivalence(strategy: Strategy, steps: int) -> dict:
    """Train ``steps`` steps distributed and (on rank 0) in one process; compare."""
    env = strategy.env
    model = strategy.apply(wl.make_model(0))
    opt = wl.make_optimizer(model)
    losses = list(
        wl.train(
            model,
            opt,
            range(steps),
            rank=env.rank,
            world=env.world_size,
            clip=strategy.clip_grad_norm_,
            mean=all_reduce_mean,
        )
    )
    msd, _ = strategy.full_state_dict(model, opt)
    if env.rank != 0:
        return {}
    ref = wl.make_model(0).to(env.device)  # same kernels: only the reduction order differs
    ref_losses = list(wl.train(ref, wl.make_optimizer(ref), range(steps)))
    loss_rel = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)]
    weight_rel = max(dist_contract.rel_err(msd[k], v.cpu()) for k, v in ref.state_dict().items())
    return {
        "losses": losses,
        "ref_losses": ref_losses,
        "max_loss_rel_err": max(loss_rel),
        "max_weight_rel_err": weight_rel,
    }


def moe_steps(strategy: Strategy, steps: int = 3) -> dict:
    """A MoE model (top-1 of 4 experts: some get no token, hence no gradient) trains."""
    env = strategy.env
    cfg = wl.TINY.model_copy(update={"moe": MoEConfig(enabled=True, num_experts=4, top_k=1)})
    model = strategy.apply(wl.make_model(0, cfg))
    opt = wl.make_optimizer(model)
    losses = list(
        wl.train(
            model,
            opt,
            range(steps),
            rank=env.rank,
            world=env.world_size,
            clip=strategy.clip_grad_norm_,
            mean=all_reduce_mean,
        )
    )
    unused = getattr(model, "find_unused_parameters", None)
    return {"losses": losses, "find_unused_parameters": unused}


def gpu_extras(strategy: Strategy, steps: int = 5) -> dict:
    """CUDA only: FSDP2 with bf16 compute and with CPU offload, against the fp32 losses."""
    if strategy.env.device.type != "cuda" or strategy.name != "fsdp":
        return {}
    env, out = strategy.env, {}
    base = strategy.cfg
    variants = {
        "fp32": (base, "fp32"),
        "bf16": (base, "bf16"),
        "cpu_offload": (base.model_copy(update={"fsdp": FSDPOptions(cpu_offload=True)}), "fp32"),
    }
    for name, (cfg, precision) in variants.items():
        variant = build_strategy(cfg, env=env, precision=precision)
        model = variant.apply(wl.make_model(0))
        opt = wl.make_optimizer(model)
        out[name] = list(
            wl.train(
                model,
                opt,
                range(steps),
                rank=env.rank,
                world=env.world_size,
                clip=variant.clip_grad_norm_,
                mean=all_reduce_mean,
            )
        )
    return out


def cross_load(strategy: Strategy, args: argparse.Namespace) -> dict:
    """Load --load-ckpt (written elsewhere), compare with --load-ref; train 3 steps; save."""
    env = strategy.env
    model = strategy.apply(wl.make_model(5))
    opt = wl.make_optimizer(model)
    out: dict = {}
    if args.load_ckpt:
        load_dcp(args.load_ckpt, strategy, model, opt)
        msd, osd = strategy.full_state_dict(model, opt)
        if env.rank == 0:
            ref = torch.load(args.load_ref, weights_only=True)
            out["model_equal"] = dist_contract.states_equal(msd, ref["model"])
            out["optim_equal"] = dist_contract.states_equal(osd, ref["optim"])
    list(
        wl.train(
            model,
            opt,
            range(100, 103),
            rank=env.rank,
            world=env.world_size,
            clip=strategy.clip_grad_norm_,
        )
    )
    if args.save_ckpt:
        files = save_dcp(args.save_ckpt, strategy, model, opt)
        msd, osd = strategy.full_state_dict(model, opt)
        if env.rank == 0:
            torch.save({"model": msd, "optim": osd}, args.save_ref)
            out["saved_files"] = [str(p) for p in files]
    return out


def run_checks(args: argparse.Namespace) -> None:
    env = setup_distributed(args.backend, timeout_seconds=args.timeout)
    strategy = build_strategy(
        DistributedConfig(strategy=args.strategy, world_size=2), env=env, precision="fp32"
    )
    t0 = time.perf_counter()
    results = {"contract": dist_contract.run_contract(strategy, Path(args.workdir))}
    results["equivalence"] = equivalence(strategy, args.steps)
    results["cross_load"] = cross_load(strategy, args)
    results["moe"] = moe_steps(strategy)
    results["gpu"] = gpu_extras(strategy)
    results["seconds"] = time.perf_counter() - t0
    if env.rank == 0:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    teardown_distributed()


def run_fault(args: argparse.Namespace) -> None:
    env = setup_distributed("gloo", timeout_seconds=args.timeout)
    strategy = build_strategy(DistributedConfig(strategy="ddp"), env=env)
    model = strategy.apply(wl.make_model(0))
    opt = wl.make_optimizer(model)
    start = time.perf_counter()
    try:
        with distributed_errors("training step"):
            for step in range(10_000):
                if env.rank == 1 and step == 3:
                    print(f"rank 1: {args.mode} at step {step}", flush=True)
                    if args.mode == "die":
                        os._exit(1)
                    time.sleep(3600)
                list(
                    wl.train(
                        model,
                        opt,
                        range(step, step + 1),
                        rank=env.rank,
                        world=env.world_size,
                        mean=all_reduce_mean,
                    )
                )
    except DistributedError as exc:
        print(f"FAULT-REPORT after {time.perf_counter() - start:.1f}s: {exc}", flush=True)
        sys.exit(3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["check", "die", "hang"], default="check")
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--backend", choices=["gloo", "nccl", "auto"], default="gloo")
    parser.add_argument("--workdir", default=".")
    parser.add_argument("--out", default="results.json")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=int, default=60)
    parser.add_argument("--load-ckpt")
    parser.add_argument("--load-ref")
    parser.add_argument("--save-ckpt")
    parser.add_argument("--save-ref")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.mode == "check":
        run_checks(args)
        exit_process(0)  # after teardown: gloo can abort in finalization (see exit_process)
    else:
        run_fault(args)


if __name__ == "__main__":
    main()
