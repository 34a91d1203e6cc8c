"""Multi-GPU scaling: tokens/s per GPU and peak memory of a profile's Trainer run.

Run under torchrun (or ``python -m apt launch``); rank 0 appends one JSON line to ``--out``::

    torchrun --nproc-per-node 1 benchmarks/scaling.py --profile standard --label single
    torchrun --nproc-per-node 2 benchmarks/scaling.py --profile ddp --label ddp
    torchrun --nproc-per-node 2 benchmarks/scaling.py --profile fsdp --label fsdp

Each process trains ``--steps`` optimizer steps of the profile (its micro-batch per GPU, so this
is weak scaling); steps after ``--warmup`` (compilation, allocator warm-up) are timed.
Scaling efficiency = tokens/s on N GPUs / (N x tokens/s on 1 GPU).

``--timing window`` (default) synchronises the device once before the first timed step and once
after the last: the throughput a run gets, host and device overlapping as they do in training.
``--timing step`` synchronises around every step and reports the median step (the method of the
results recorded before 2026-12; it hides host work that overlaps the device).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from apt import load_profile
from apt.trainops.engine import Callback, Control, RunState, Trainer

_sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)


class Timer(Callback):
    """Seconds per step after ``warmup`` steps: the median of synchronised steps (``step``),
    or one window over every timed step (``window``)."""

    def __init__(self, warmup: int, mode: str) -> None:
        self.warmup, self.mode = warmup, mode
        self.times: list[float] = []
        self._t = 0.0
        self._window: tuple[float, int] | None = None

    def on_step_start(self, state: RunState, control: Control) -> None:
        if self.mode == "step" or state.global_step == self.warmup:
            _sync()
            self._t = time.perf_counter()
            self._window = (self._t, state.global_step)

    def on_step_end(self, state: RunState, control: Control) -> None:
        if self.mode == "step":
            _sync()
            if state.global_step > self.warmup:
                self.times.append(time.perf_counter() - self._t)
        elif state.global_step == state.max_steps and self._window is not None:
            _sync()  # the window ends with the last step, before the final eval and save
            start, first = self._window
            steps = state.global_step - first
            self.times = [(time.perf_counter() - start) / steps] * steps

    @property
    def step_seconds(self) -> float:
        return statistics.median(self.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="standard")
    parser.add_argument("--label", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--timing", choices=("window", "step"), default="window")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scaling.jsonl"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    overrides = [
        f"training.max_steps={args.steps}",
        "training.auto_resume=false",
        "training.checkpoints.save_interval=null",
        "eval.at_start=false",
        "eval.max_batches=1",
        "monitoring.progress_bar=false",
        "artifacts.save_final_model=false",
        f"artifacts.experiment_name=scaling-{args.label}",
        *args.overrides,
    ]
    cfg = load_profile(args.profile, overrides=overrides)
    timer = Timer(args.warmup, args.timing)
    trainer = Trainer.from_config(cfg, callbacks=[timer])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    world = trainer.env.world_size
    tokens_per_step = (
        cfg.training.batch_size
        * cfg.data.seq_len
        * cfg.training.gradient_accumulation_steps
        * world
    )
    peak_bytes = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    peak = torch.tensor(peak_bytes / 2**30, device=trainer.device)
    if world > 1:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    step_s = timer.step_seconds
    result = {
        "label": args.label,
        "profile": args.profile,
        "strategy": cfg.training.distributed.strategy,
        "gpus": world,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "precision": cfg.training.precision,
        "compile": cfg.training.compile,
        "tokens_per_step": tokens_per_step,
        "median_step_s": round(step_s, 5),
        "tokens_per_s": round(tokens_per_step / step_s),
        "tokens_per_s_per_gpu": round(tokens_per_step / step_s / world),
        "peak_memory_gib": round(float(peak), 2),
        "timed_steps": len(timer.times),
        "timing": args.timing,
    }
    if trainer.env.is_main:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as fh:
            fh.write(json.dumps(result) + "\n")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
