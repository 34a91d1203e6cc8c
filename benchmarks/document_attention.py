"""Fine-tuning batch layouts: padded rows, and padding-free rows under each document kernel.

The same examples (lengths drawn from a long-tailed mix, as chat data is) are trained forward
and backward in one process as a padded batch (one example a row, padded to the longest, plain
causal SDPA: the baseline) and as one padding-free row of their total length with the
``mask``, ``varlen`` and ``flex`` kernels of ``model.document_attention``. Prints the median
step time, tokens/s of real (non-padding) tokens, peak memory and the ratio to the baseline.

    python benchmarks/document_attention.py --device cuda --preset small
    python benchmarks/document_attention.py                      # CPU, a tiny model
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from apt.core.config import ModelConfig
from apt.model import build_model


def lengths(n: int, longest: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    uniform = torch.rand(n, generator=gen).clamp_min(1e-6)
    draws = -torch.log(uniform) * longest / 4  # exponential, mean longest / 4
    return [int(x) for x in draws.clamp(16, longest).tolist()]


def batches(lens: list[int], vocab: int, device: str) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, vocab, (n,), generator=gen) for n in lens]
    longest = max(lens)
    padded = torch.zeros(len(rows), longest, dtype=torch.int64)
    labels = torch.full_like(padded, -100)
    for i, row in enumerate(rows):
        padded[i, : len(row)], labels[i, : len(row)] = row, row
    joined = torch.cat(rows)[None]
    docs = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(lens))[None]
    return {
        "padded": {"input_ids": padded.to(device), "targets": labels.to(device)},
        "joined": {
            "input_ids": joined.to(device),
            "targets": joined.to(device),
            "document_ids": docs.to(device),
        },
    }


def time_steps(model: torch.nn.Module, batch: dict, steps: int, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            loss = model(**batch, return_logits=False).loss
        loss.backward()
        sync()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--longest", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    lens = lengths(args.examples, args.longest, seed=0)
    shape = {"preset": args.preset} if args.preset else {"hidden_size": 64, "num_layers": 2}
    base = {**shape, "vocab_size": 50304, "max_seq_len": args.longest}
    data = batches(lens, 50304, args.device)
    real = sum(lens)
    runs = [("padded", "auto", "padded")] + [
        (f"padding_free {k}", k, "joined") for k in ("mask", "varlen", "flex")
    ]
    results = {}
    for name, kernel, layout in runs:
        if kernel == "flex" and args.device != "cuda":
            continue  # FlexAttention has no CPU backward
        torch.manual_seed(0)
        model = build_model(ModelConfig(**base, document_attention=kernel)).to(args.device)
        run = torch.compile(model) if args.compile else model
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = time_steps(run, data[layout], args.steps, args.device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
        results[name] = {"seconds": seconds, "tokens_per_s": real / seconds, "peak_gib": peak}
    base_s = results["padded"]["seconds"]
    for r in results.values():
        r["speedup_vs_padded"] = base_s / r["seconds"]
    print(
        json.dumps(
            {
                "examples": len(lens),
                "real_tokens": real,
                "padded_tokens": len(lens) * max(lens),
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                "compile": args.compile,
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
