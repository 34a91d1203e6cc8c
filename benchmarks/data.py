"""Loader throughput over prepared token shards: APT's ``ShardDataset`` through
``create_dataloader`` against a plain numpy memmap slicing loop over the same shards, side by
side in one process.

The folder is written here by ``prepare_shards`` (random uint16 ids, ``--tokens`` of them in
shards of ``--shard-tokens``, the byte-level dtype a 50k vocabulary uses). Both loops read
shuffled windows of ``seq_len + 1`` tokens into ``(batch, seq_len)`` int64 ``input_ids`` and
``labels`` tensors; the plain loop is what a hand-written nanoGPT-style loader does (one memmap,
a seeded permutation, fancy slicing). Each is timed in rounds, alternating, best of ``--rounds``.

    python benchmarks/data.py --json benchmarks/results/data_loader_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apt.trainops.data import ShardDataset, create_dataloader
from apt.trainops.data.shards import read_index


def write_folder(folder: Path, tokens: int, shard_tokens: int) -> Path:
    """A prepared-shard folder of random ids, in the format ``data prepare`` writes."""
    from apt.trainops.data.shards.prepare import prepare_shards

    rng = np.random.default_rng(0)
    text_dir = folder / "text"
    text_dir.mkdir(parents=True)
    # Byte tokenizer: one token per byte, so `tokens` bytes of printable text.
    data = rng.integers(32, 127, size=tokens, dtype=np.uint8).tobytes().decode("ascii")
    step = 1 << 20
    for i in range(0, len(data), step):
        (text_dir / f"{i // step:05d}.txt").write_text(data[i : i + step], encoding="ascii")
    out = folder / "shards"
    prepare_shards(
        [str(text_dir / "*.txt")],
        out,
        tokenizer_spec="byte",
        shard_tokens=shard_tokens,
        val_fraction=0.01,
    )
    return out


def apt_loop(folder: Path, args: argparse.Namespace, batches: int) -> float:
    dataset = ShardDataset(folder, "train", args.seq_len)
    loader = create_dataloader(
        dataset, batch_size=args.batch, num_workers=args.workers, seed=0, shuffle=True
    )
    start = time.perf_counter()
    seen = 0
    for batch in loader:
        seen += int(batch["input_ids"].numel())
        if seen >= batches * args.batch * args.seq_len:
            break
    return seen / (time.perf_counter() - start)


def plain_loop(folder: Path, args: argparse.Namespace, batches: int) -> float:
    index = read_index(folder)
    split = index.splits["train"]
    maps = [np.memmap(folder / s.file, dtype=index.dtype, mode="r") for s in split.shards]
    # One array, as nanoGPT's single .bin: the shards are read into memory first (a stricter
    # baseline than slicing the memmaps, which the clock does not include).
    stream = np.concatenate(maps) if len(maps) > 1 else maps[0]
    T = args.seq_len
    n = (len(stream) - 1) // T
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).numpy()
    start = time.perf_counter()
    seen = 0
    for b in range(batches):
        rows = order[b * args.batch : (b + 1) * args.batch]
        windows = np.stack([stream[r * T : r * T + T + 1] for r in rows]).astype(np.int64)
        ids, labels = torch.from_numpy(windows[:, :-1]), torch.from_numpy(windows[:, 1:])
        assert ids.shape == labels.shape
        seen += int(ids.numel())
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64_000_000)
    parser.add_argument("--shard-tokens", type=int, default=16_000_000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=600)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="apt-data-bench-") as tmp:
        folder = write_folder(Path(tmp), args.tokens, args.shard_tokens)
        apt_rates, plain_rates = [], []
        for _ in range(args.rounds):
            plain_rates.append(plain_loop(folder, args, args.batches))
            apt_rates.append(apt_loop(folder, args, args.batches))
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "tokens": args.tokens,
        "shard_tokens": args.shard_tokens,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "workers": args.workers,
        "plain_memmap_tokens_per_second": round(max(plain_rates)),
        "apt_loader_tokens_per_second": round(max(apt_rates)),
        "ratio": round(max(apt_rates) / max(plain_rates), 3),
    }
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
