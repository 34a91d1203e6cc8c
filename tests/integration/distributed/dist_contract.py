"""The checks every registered strategy must pass, run the same way on 1 or N processes.

:func:`run_contract` runs each check on every rank (most are collective) and returns, on every
rank, ``{check: {"ok": bool, ...measurements}}``; only rank 0's answer is meant to be read.
References are computed in-process with a plain, unwrapped copy of the model and the *global*
batch, which is what the distributed result must equal.
"""

from __future__ import annotations

import math
import traceback
import warnings
from pathlib import Path
from typing import Any

import dist_workload as wl
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from apt.trainops.checkpoints.dcp import load_dcp, save_dcp
from apt.trainops.distributed import Strategy

# fp32 with a different reduction order (per-rank partial sums, then an all-reduce) differs from
# the single-process result by a few ulps per op: ~1e-7 relative. Gradient norms and
# accumulated gradients pass through a handful of such sums, so 1e-5 leaves margin while still
# catching any real error (a missing 1/world factor, a skipped sync: errors of order 1).
GRAD_RTOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient (DTensor shards gathered; collective under FSDP)."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if isinstance(g, DTensor):
            g = g.full_tensor()
        out[name.removeprefix("module.")] = g.detach().cpu().clone()
    return out


def grads_rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(rel_err(a[k], b[k]) for k in a)


def states_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Bit-for-bit equality of two (nested) state dicts."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _wrapped(strategy: Strategy, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    original = wl.make_model(seed)
    return original, strategy.apply(original)


def check_apply_unwrap(strategy: Strategy) -> dict[str, Any]:
    original, model = _wrapped(strategy)
    kinds = {"ddp": DistributedDataParallel, "fsdp": FSDPModule}
    expected = kinds.get(strategy.name) if strategy.env.world_size > 1 else None
    devices = {p.device.type for p in model.parameters()}
    with warnings.catch_warnings():  # torch's own inductor imports warn (torch.jit)
        warnings.simplefilter("ignore", DeprecationWarning)
        compiled = torch.compile(model)  # a wrapper only; nothing compiles until it is called
    return {
        "ok": strategy.unwrap(model) is original
        and strategy.unwrap(compiled) is original
        and devices == {strategy.env.device.type}
        and (expected is None or isinstance(model, expected))
        and (strategy.name != "fsdp" or all(isinstance(b, FSDPModule) for b in original.blocks)),
        "wrapper": type(model).__name__,
        "devices": sorted(devices),
    }


def check_sampler(strategy: Strategy) -> dict[str, Any]:
    got = strategy.sampler_rank_world()
    return {"ok": got == (strategy.env.rank, strategy.env.world_size), "got": list(got)}


def check_full_state(strategy: Strategy) -> dict[str, Any]:
    """Gathered on rank 0 only, CPU, user's names, the exact initial weights."""
    _, model = _wrapped(strategy)
    opt = wl.make_optimizer(model)
    msd, osd = strategy.full_state_dict(model, opt)  # before any step: the init weights
    init = wl.make_model(0).state_dict()
    if strategy.env.rank != 0:
        return {"ok": msd == {} and osd == {}}
    names = [n for n, _ in wl.make_model(0).named_parameters()]
    return {
        "ok": states_equal(msd, init)
        and all(t.device.type == "cpu" for t in msd.values())
        and osd.get("param_groups", [{}])[0].get("params") == names,
        "keys": len(msd),
    }


def check_load_full(strategy: Strategy) -> dict[str, Any]:
    """Load full states given on rank 0 only (broadcast) and on every rank: exact round trip."""
    rank0 = strategy.env.rank == 0
    _, model = _wrapped(strategy)
    opt = wl.make_optimizer(model)
    list(
        wl.train(
            model,
            opt,
            range(2),
            rank=strategy.env.rank,
            world=strategy.env.world_size,
            clip=strategy.clip_grad_norm_,
        )
    )
    msd, osd = strategy.full_state_dict(model, opt)
    other = wl.make_model(1).state_dict()
    strategy.load_full_state_dict(model, opt, other if rank0 else {}, {})
    after_other, _ = strategy.full_state_dict(model, opt)
    strategy.load_full_state_dict(model, opt, msd if rank0 else {}, osd if rank0 else {})
    back_m, back_o = strategy.full_state_dict(model, opt)
    every = wl.make_model(2).state_dict()  # same on every rank: each loads its own copy
    strategy.load_full_state_dict(model, None, every, {})
    after_every, _ = strategy.full_state_dict(model, None)
    if not rank0:
        return {"ok": True}
    return {
        "ok": states_equal(after_other, other)
        and states_equal(back_m, msd)
        and states_equal(back_o, osd)
        and states_equal(after_every, every),
        "broadcast_model": states_equal(after_other, other),
        "optimizer_round_trip": states_equal(back_o, osd),
        "every_rank_load": states_equal(after_every, every),
    }


def check_clip(strategy: Strategy) -> dict[str, Any]:
    """The norm is the global batch's gradient norm; clipping to half halves it."""
    env = strategy.env
    _, model = _wrapped(strategy)
    wl.lm_loss(model, wl.shard(wl.global_batch(0), env.rank, env.world_size)).backward()
    norm_tensor = strategy.clip_grad_norm_(model, math.inf)
    assert isinstance(norm_tensor, torch.Tensor) and norm_tensor.dim() == 0  # no host sync
    norm = float(norm_tensor)
    ref = wl.make_model(0).to(env.device)  # same kernels: only the reduction order differs
    wl.lm_loss(ref, wl.global_batch(0)).backward()
    ref_norm = float(torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]))
    strategy.clip_grad_norm_(model, norm / 2)
    clipped = float(strategy.clip_grad_norm_(model, math.inf))
    err = abs(norm - ref_norm) / ref_norm
    half_err = abs(clipped - norm / 2) / (norm / 2)
    return {
        "ok": err < GRAD_RTOL and half_err < GRAD_RTOL,
        "norm": norm,
        "ref_norm": ref_norm,
        "rel_err": err,
        "clip_rel_err": half_err,
    }


def check_no_sync(strategy: Strategy, micro: int = 4) -> dict[str, Any]:
    """k micro-batches synced on the last only == synced on each == one process, global batch."""
    env = strategy.env
    _, lazy = _wrapped(strategy)
    wl.accumulate(lazy, micro, rank=env.rank, world=env.world_size, no_sync=strategy.no_sync)
    lazy_grads = full_grads(lazy)
    _, eager = _wrapped(strategy)
    wl.accumulate(eager, micro, rank=env.rank, world=env.world_size)
    eager_grads = full_grads(eager)
    ref = wl.make_model(0).to(env.device)
    wl.accumulate(ref, micro, rank=0, world=1)
    ref_grads = {n: p.grad.cpu().clone() for n, p in ref.named_parameters()}
    lazy_vs_eager = grads_rel_err(lazy_grads, eager_grads)
    lazy_vs_ref = grads_rel_err(lazy_grads, ref_grads)
    return {
        "ok": lazy_vs_eager < GRAD_RTOL and lazy_vs_ref < GRAD_RTOL,
        "no_sync_vs_sync_rel_err": lazy_vs_eager,
        "no_sync_vs_single_rel_err": lazy_vs_ref,
    }


def check_sharded_round_trip(strategy: Strategy, folder: Path) -> dict[str, Any]:
    env = strategy.env
    _, model = _wrapped(strategy)
    opt = wl.make_optimizer(model)
    list(
        wl.train(
            model, opt, range(2), rank=env.rank, world=env.world_size, clip=strategy.clip_grad_norm_
        )
    )
    before_m, before_o = strategy.full_state_dict(model, opt)
    files = save_dcp(folder, strategy, model, opt)
    _, fresh = _wrapped(strategy, seed=3)
    fresh_opt = wl.make_optimizer(fresh)
    load_dcp(folder, strategy, fresh, fresh_opt)
    after_m, after_o = strategy.full_state_dict(fresh, fresh_opt)
    if env.rank != 0:
        return {"ok": True}
    names = sorted(str(p.relative_to(folder)) for p in files)
    return {
        "ok": states_equal(after_m, before_m)
        and states_equal(after_o, before_o)
        and all(p.is_file() for p in files)
        and "model/.metadata" in names
        and "optim/.metadata" in names,
        "files": names,
    }


def check_sharded_flag(strategy: Strategy) -> dict[str, Any]:
    expected = strategy.name == "fsdp" and strategy.env.world_size > 1
    return {"ok": strategy.sharded == expected, "sharded": strategy.sharded}


def run_contract(strategy: Strategy, workdir: Path) -> dict[str, dict[str, Any]]:
    checks = {
        "apply_unwrap": lambda: check_apply_unwrap(strategy),
        "sampler": lambda: check_sampler(strategy),
        "sharded_flag": lambda: check_sharded_flag(strategy),
        "full_state": lambda: check_full_state(strategy),
        "load_full": lambda: check_load_full(strategy),
        "clip_grad_norm": lambda: check_clip(strategy),
        "no_sync": lambda: check_no_sync(strategy),
        "sharded_round_trip": lambda: check_sharded_round_trip(
            strategy, workdir / f"contract-{strategy.name}"
        ),
    }
    results: dict[str, dict[str, Any]] = {}
    for name, check in checks.items():
        try:
            results[name] = check()
        except Exception:  # recorded so every check reports, not only the first failure
            results[name] = {"ok": False, "error": traceback.format_exc()[-2000:]}
    return results


CONTRACT_CHECKS = (
    "apply_unwrap",
    "sampler",
    "sharded_flag",
    "full_state",
    "load_full",
    "clip_grad_norm",
    "no_sync",
    "sharded_round_trip",
)
