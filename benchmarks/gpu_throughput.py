"""GPU throughput: APT's ``standard`` path against a plain compiled loop, in one process.

The plain loop is written here: a GPT-2 of the same width, depth and vocabulary (LayerNorm,
GELU MLP, learned positions, SDPA attention, tied head), its loss compiled together with it,
fused AdamW, bf16 autocast, gradient clipping. APT runs the ``standard`` profile through
``Trainer`` (accumulation 1) once per lever set: each ``--lever`` is a list of ``--set``-style
overrides, so every lever is a config key a user can set. Both see the same random tokens;
each reports tokens/s over the steps after the warm-up (compilation, autotuning), MFU
(6N + 12 L H T FLOPs per token, N the parameters that multiply, against the device's
``apt.trainops.monitoring.PEAK_FLOPS`` entry) and peak memory.

    python benchmarks/gpu_throughput.py --json benchmarks/results/gpu_throughput_h200.json \
        --lever training.compile_mode=max-autotune-no-cudagraphs
    python benchmarks/gpu_throughput.py --device cpu --preset tiny --seq-len 64 --batch 2 \
        --steps 3 --warmup 2 --no-compile                    # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from apt.core.config import load_profile
from apt.core.config.model import PRESETS
from apt.trainops.engine import Callback, Control, RunState, Trainer
from apt.trainops.monitoring import flops_per_token, multiplying_parameters, peak_flops


# ----------------------------------------------------------------------------- the plain loop
class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    """The reference network, loss included, so ``torch.compile`` sees both."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(ids.size(1), device=ids.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def plain_run(args: argparse.Namespace, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    shape = _shape(args)
    model = GPT2(args.vocab, shape["hidden_size"], shape["num_layers"], shape["num_heads"],
                 args.seq_len).to(args.device)  # fmt: skip
    fused = args.device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=fused)  # fmt: skip
    step_fn = torch.compile(model) if args.compile else model
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    clock = Clock(args)
    for i, batch in enumerate(batches):
        ids = batch["input_ids"].to(args.device, non_blocking=True)
        labels = batch["labels"].to(args.device, non_blocking=True)
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            loss = step_fn(ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.after_step(i + 1)
    flops = flops_per_token(
        multiplying_parameters(model),
        num_layers=shape["num_layers"],
        hidden_size=shape["hidden_size"],
        seq_len=args.seq_len,
    )
    return clock.report("plain compiled loop" if args.compile else "plain loop", flops)


# ----------------------------------------------------------------------------- APT
class StepClock(Callback):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_step_end(self, state: RunState, control: Control) -> None:
        self.clock.after_step(state.global_step)


def apt_run(
    args: argparse.Namespace, batches: list[dict[str, torch.Tensor]], lever: list[str]
) -> dict[str, Any]:
    out = tempfile.mkdtemp(prefix="apt-gpu-throughput-")
    try:
        return _apt_run(args, batches, [*args.set, *lever], out)
    finally:  # the final checkpoint of a 1.6B model is 26 GB: do not let them pile up
        shutil.rmtree(out)


def _apt_run(
    args: argparse.Namespace, batches: list[dict[str, torch.Tensor]], lever: list[str], out: str
) -> dict[str, Any]:
    overrides = [
        f"training.max_steps={len(batches)}",
        "training.gradient_accumulation_steps=1",
        f"training.batch_size={args.batch}",
        f"training.device={args.device}",
        f"training.precision={args.precision}",
        f"training.compile={str(args.compile).lower()}",
        "training.auto_resume=false",
        "training.checkpoints.save_interval=null",
        f"model.preset={args.preset}",
        f"model.vocab_size={args.vocab}",
        f"model.max_seq_len={args.seq_len}",
        f"data.seq_len={args.seq_len}",
        "eval.at_start=false",
        "monitoring.progress_bar=false",
        "monitoring.log_interval=1000000",
        f"artifacts.output_dir={out}",
        "artifacts.save_final_model=false",
        *lever,
    ]
    cfg = load_profile("standard", overrides=overrides)
    clock = Clock(args)
    trainer = Trainer.from_config(
        cfg, train_dataloader=DataLoader(batches, batch_size=None), callbacks=[StepClock(clock)]
    )
    raw = trainer.strategy.unwrap(trainer.model)
    flops = flops_per_token(
        multiplying_parameters(raw),
        num_layers=cfg.model.num_layers,
        hidden_size=cfg.model.hidden_size,
        seq_len=args.seq_len,
    )
    trainer.train()
    trainer.close()
    return clock.report("APT " + (" ".join(lever) or "standard"), flops)


# ----------------------------------------------------------------------------- measuring
class Clock:
    """Wall time over the steps after ``args.warmup`` (one device sync at each end), and the
    peak memory of the whole run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sync: Callable[[], None] = (
            torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        )
        self.start = self.end = math.nan
        self.profiler: Any = None
        self.profile: dict[str, float] | None = None
        self.top_kernels: list[tuple[str, float]] | None = None
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def after_step(self, step: int) -> None:
        if step == self.args.warmup:
            self.sync()
            self.start = time.perf_counter()
        elif step == self.args.warmup + self.args.steps:
            self.sync()
            self.end = time.perf_counter()
            if self.args.profile_steps:  # after the clock: profiling costs time itself
                self.profiler = torch.profiler.profile()
                self.profiler.__enter__()
        elif self.profiler is not None and step == self.args.warmup + self.args.steps + (
            self.args.profile_steps
        ):
            self.sync()
            self.profiler.__exit__(None, None, None)
            self.profile = kernel_time_by_kind(self.profiler, self.args.profile_steps)
            self.top_kernels = largest_kernels(self.profiler, self.args.profile_steps)

    def report(self, name: str, flops: float) -> dict[str, Any]:
        seconds = self.end - self.start
        tokens_per_second = self.args.steps * self.args.batch * self.args.seq_len / seconds
        peak = peak_flops(torch.device(self.args.device))
        memory = (
            torch.cuda.max_memory_allocated() / 2**30
            if self.args.device.startswith("cuda")
            else None
        )
        step_ms = 1e3 * seconds / self.args.steps
        busy = None if not self.profile else round(sum(self.profile.values()) / step_ms, 3)
        return {
            "run": name,
            "step_ms": round(step_ms, 2),
            "device_busy_fraction": busy,
            "device_ms_per_step_by_kind": self.profile,
            "largest_kernels_ms_per_step": self.top_kernels,
            "tokens_per_second": round(tokens_per_second),
            "mfu": None if peak is None else round(tokens_per_second * flops / peak, 4),
            "flops_per_token": flops,
            "peak_memory_gib": None if memory is None else round(memory, 2),
        }


#: Kernel name fragments -> what the time is spent on (first match wins).
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("fused elementwise (triton)", ("triton",)),
    ("matmul", ("nvjet", "gemm", "xmma", "cutlass", "matmul", "wgmma", "cublas")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy", ("memcpy", "memset", "copy")),
)


def device_kernels(profiler: Any, steps: int) -> list[tuple[str, float]]:
    """Every device kernel of a profile of ``steps`` steps and its milliseconds per step."""
    kernels = []
    for event in profiler.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "self_cuda_time_total", 0.0)
        if not device_us or getattr(event, "device_type", None) is None:
            continue
        if str(event.device_type).endswith("CPU"):
            continue
        kernels.append((event.key, device_us / 1e3 / steps))
    return kernels


def kernel_time_by_kind(profiler: Any, steps: int) -> dict[str, float]:
    """Device milliseconds per step by kind of kernel, from a profile of ``steps`` steps."""
    totals: dict[str, float] = {}
    for key, ms in device_kernels(profiler, steps):
        name = key.lower()
        kind = next((k for k, parts in KERNEL_KINDS if any(p in name for p in parts)), "other")
        totals[kind] = totals.get(kind, 0.0) + ms
    return {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def largest_kernels(profiler: Any, steps: int, top: int = 25) -> list[tuple[str, float]]:
    """The ``top`` kernels by device time per step (names cut to 100 characters)."""
    kernels = sorted(device_kernels(profiler, steps), key=lambda kv: -kv[1])[:top]
    return [(key[:100], round(ms, 3)) for key, ms in kernels]


def _shape(args: argparse.Namespace) -> dict[str, int]:
    preset = PRESETS[args.preset]
    return {k: int(preset[k]) for k in ("hidden_size", "num_layers", "num_heads")}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="small", help="the APT model preset (and its shape)")
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=40, help="steps measured")
    parser.add_argument("--warmup", type=int, default=15, help="steps before the clock starts")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="after the clock stops, profile this many more steps: device time per step by "
        "kind of kernel (matmul, attention, fused elementwise, optimizer, ...) in the results",
    )
    parser.add_argument(
        "--lever",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="an APT run with these overrides (repeatable; the default run always goes first)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for every APT run, the default one included (repeatable)",
    )
    parser.add_argument(
        "--skip-plain", action="store_true", help="APT runs only (no ratios; saves a compile)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    total = args.warmup + args.steps + args.profile_steps
    ids = torch.randint(0, args.vocab, (total, args.batch, args.seq_len + 1),
                        generator=gen)  # fmt: skip
    batches = [{"input_ids": x[:, :-1], "labels": x[:, 1:]} for x in ids]
    levers = [[p for p in group.split(",") if p] for group in args.lever]
    if any(p.startswith("training.batch_size=") for lever in levers for p in lever):
        parser.error("the batches are built here: set the batch size with --batch (both loops)")
    rows = [] if args.skip_plain else [plain_run(args, batches)]
    for row in rows:
        print(json.dumps(row), flush=True)  # as each run ends: a cut-off call keeps them
    for lever in [[], *levers]:
        rows.append(apt_run(args, batches, lever))
        print(json.dumps(rows[-1]), flush=True)
    base = None if args.skip_plain else rows[0]["tokens_per_second"]
    for row in rows:
        row["vs_plain"] = None if base is None else round(row["tokens_per_second"] / base, 3)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": name,
        "torch": torch.__version__,
        "shape": {**_shape(args), "vocab": args.vocab, "seq_len": args.seq_len},
        "batch": args.batch,
        "precision": args.precision,
        "steps_measured": args.steps,
        "rows": rows,
    }
    print(json.dumps(result, indent=2))
    for row in rows:
        mfu = "" if row["mfu"] is None else f"  MFU {row['mfu']:.1%}"
        print(f"{row['run']:<60} {row['tokens_per_second']:>10,} tok/s  x{row['vs_plain']}{mfu}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
