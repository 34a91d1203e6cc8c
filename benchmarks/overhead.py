"""Trainer overhead: time per optimizer step of ``Trainer`` vs a plain PyTorch loop.

Both train the same model on the same batches in this process, interleaved in rounds (plain,
Trainer, plain, Trainer, ...) so that machine noise hits both alike; the medians of the per-step
times and their ratio are printed. The plain loop does the same work a Trainer step does:
forward, cross-entropy, backward, gradient clipping, AdamW, LR schedule, zero_grad.

    python benchmarks/overhead.py                 # CPU, the quickstart model
    python benchmarks/overhead.py --device cuda --preset small --seq-len 1024 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from apt.core.config import ModelConfig, config_from_dict
from apt.model import build_model
from apt.trainops.engine import Callback, Control, RunState, Trainer


def make_batches(n: int, batch: int, seq: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, batch, seq + 1), generator=gen)
    return [{"input_ids": x[:, :-1], "labels": x[:, 1:]} for x in ids]


class StepTimer(Callback):
    def __init__(self, sync: Any) -> None:
        self.sync, self.times, self._t = sync, [], 0.0

    def on_step_start(self, state: RunState, control: Control) -> None:
        self.sync()
        self._t = time.perf_counter()

    def on_step_end(self, state: RunState, control: Control) -> None:
        self.sync()
        self.times.append(time.perf_counter() - self._t)


def plain_loop(
    model: torch.nn.Module, batches: list[Any], args: argparse.Namespace, sync: Any
) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    times = []
    for batch in batches:
        sync()
        t = time.perf_counter()
        ids = batch["input_ids"].to(args.device, non_blocking=True)
        labels = batch["labels"].to(args.device, non_blocking=True)
        with torch.autocast(args.device, dtype=dtype, enabled=dtype is not None):
            logits = model(ids).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        loss.item()  # the Trainer reads the loss every step too (progress, callbacks)
        sync()
        times.append(time.perf_counter() - t)
    return times


def trainer_loop(
    model: torch.nn.Module, batches: list[Any], args: argparse.Namespace, sync: Any, out: Path
) -> list[float]:
    timer = StepTimer(sync)
    # What a user switches off to time steps: progress bar, validation, model export, resume.
    config = config_from_dict(
        {
            "training": {
                "max_steps": len(batches),
                "learning_rate": 1e-3,
                "precision": args.precision,
                "device": args.device,
                "auto_resume": False,
                "on_nonfinite": args.on_nonfinite,
                "checkpoints": {"save_interval": None},
            },
            "eval": {"at_start": False},
            "monitoring": {"progress_bar": False, "log_interval": 10},
            "artifacts": {
                "output_dir": str(out),
                "experiment_name": f"overhead-{time.time_ns()}",
                "save_final_model": False,
            },
        }
    )
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(batches, batch_size=None),
        config=config,
        callbacks=[timer],
    )
    trainer.train()
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument(
        "--on-nonfinite",
        default="stop",
        choices=["stop", "skip_step", "continue"],
        help="training.on_nonfinite of the Trainer (stop: the default's cost is measured)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()

    sizes = (
        {"preset": args.preset}
        if args.preset
        else {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": 4}
    )
    cfg = ModelConfig(vocab_size=256, max_seq_len=args.seq_len, **sizes)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    batches = make_batches(args.steps, args.batch, args.seq_len, cfg.vocab_size)
    out = Path("runs/bench")
    plain, framework = [], []
    for round_ in range(args.rounds + 1):
        torch.manual_seed(round_)
        p = plain_loop(build_model(cfg).to(args.device), batches, args, sync)
        torch.manual_seed(round_)
        f = trainer_loop(build_model(cfg), batches, args, sync, out)
        if round_ > 0:  # round 0 warms up allocators and kernels for both
            plain += p[2:]
            framework += f[2:]
    p_med, f_med = statistics.median(plain), statistics.median(framework)
    result = {
        "device": args.device,
        "model": cfg.model_dump(include={"hidden_size", "num_layers", "max_seq_len"}),
        "batch": args.batch,
        "precision": args.precision,
        "on_nonfinite": args.on_nonfinite,
        "steps_measured": len(plain),
        "plain_ms": round(p_med * 1e3, 3),
        "trainer_ms": round(f_med * 1e3, 3),
        "ratio": round(f_med / p_med, 4),
    }
    print(json.dumps(result, indent=2))
    print(f"Trainer / plain loop time per step: {result['ratio']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
