"""Loader throughput over prepared token shards: APT's ``ShardDataset`` through
``create_dataloader`` against a plain numpy memmap slicing loop over the same shards, side by
side in one process.

The folder is written here by ``prepare_shards`` (random byte-tokenizer ids, ``--tokens`` of
them in shards of ``--shard-tokens``, stored as uint16). Every loop reads the same shuffled
windows of ``seq_len + 1`` tokens, in the order the ``ResumableSampler`` draws for seed 0,
epoch 0, into ``(batch, seq_len)`` int64 ``input_ids`` and ``labels`` tensors:

* ``plain_memmap`` (the baseline of the ratio): what a hand-written nanoGPT-style loader does,
  one ``np.memmap`` per shard, the shard of a window found by bisection, each window a slice
  (two pieces joined when it spans shards), ``np.stack``, one cast to int64, then inputs and
  labels as views of the ``(B, T + 1)`` tensor;
* ``plain_in_memory``: the same loop over one array holding the whole stream, read into memory
  before the clock starts (a stricter baseline: no maps, no shard lookup);
* ``apt_loader``: ``create_dataloader`` over a ``ShardDataset``, which reads each batch with
  ``ShardDataset.get_batch`` (one call per batch, already stacked);
* ``apt_per_item``: the same loader given ``collate_fn=default_collate``, which reads item by
  item and stacks them (the path every batch took before ``get_batch``).

Each loop draws its order inside the clock (``iter(loader)`` draws the permutation) and reads
``--batches`` batches; the loops alternate in each of ``--rounds`` rounds, and the medians are
reported. Before timing, the first batch of every loop is checked equal to the plain loop's.

    python benchmarks/data.py --json benchmarks/results/data_loader_cpu.json
"""

from __future__ import annotations

import argparse
import bisect
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from apt.trainops.data import ShardDataset, create_dataloader
from apt.trainops.data.shards import read_index

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


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


def apt_batches(folder: Path, args: argparse.Namespace, *, per_item: bool = False) -> Batches:
    dataset = ShardDataset(folder, "train", args.seq_len)
    loader = create_dataloader(
        dataset,
        batch_size=args.batch,
        num_workers=args.workers,
        seed=0,
        shuffle=True,
        collate_fn=default_collate if per_item else None,
    )
    for batch in loader:
        yield batch["input_ids"], batch["labels"]


def _order(windows: int) -> list[int]:
    """The ResumableSampler's epoch-0 order for seed 0, rank 0 of 1."""
    return torch.randperm(windows, generator=torch.Generator().manual_seed(0)).tolist()


def plain_memmap_batches(folder: Path, args: argparse.Namespace) -> Batches:
    index = read_index(folder)
    shards = index.splits["train"].shards
    maps = [np.memmap(folder / s.file, dtype=index.dtype, mode="r") for s in shards]
    ends = np.cumsum([len(m) for m in maps]).tolist()
    starts = [0, *ends[:-1]]
    T, B = args.seq_len, args.batch
    order = _order((ends[-1] - 1) // T)
    for b in range(len(order) // B):
        rows = []
        for r in order[b * B : (b + 1) * B]:
            start = r * T
            k = bisect.bisect_right(ends, start)
            local = start - starts[k]
            if start + T + 1 <= ends[k]:
                rows.append(maps[k][local : local + T + 1])
            else:  # the window spans two shards
                rows.append(
                    np.concatenate([maps[k][local:], maps[k + 1][: start + T + 1 - ends[k]]])
                )
        windows = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
        yield windows[:, :-1], windows[:, 1:]


def plain_in_memory_batches(stream: np.ndarray, args: argparse.Namespace) -> Batches:
    T, B = args.seq_len, args.batch
    order = _order((len(stream) - 1) // T)
    for b in range(len(order) // B):
        rows = order[b * B : (b + 1) * B]
        windows = np.stack([stream[r * T : r * T + T + 1] for r in rows]).astype(np.int64)
        windows_t = torch.from_numpy(windows)  # (B, T + 1)
        yield windows_t[:, :-1], windows_t[:, 1:]


def tokens_per_second(batches: Callable[[], Batches], count: int) -> float:
    start = time.perf_counter()
    seen = 0
    for done, (ids, labels) in enumerate(batches(), start=1):
        assert ids.shape == labels.shape
        seen += int(ids.numel())
        if done == count:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64_000_000)
    parser.add_argument("--shard-tokens", type=int, default=16_000_000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="apt-data-bench-") as tmp:
        folder = write_folder(Path(tmp), args.tokens, args.shard_tokens)
        index = read_index(folder)
        stream = np.concatenate(
            [np.fromfile(folder / s.file, dtype=index.dtype) for s in index.splits["train"].shards]
        )
        loops: dict[str, Callable[[], Batches]] = {
            "plain_memmap": lambda: plain_memmap_batches(folder, args),
            "plain_in_memory": lambda: plain_in_memory_batches(stream, args),
            "apt_loader": lambda: apt_batches(folder, args),
            "apt_per_item": lambda: apt_batches(folder, args, per_item=True),
        }
        want = next(loops["plain_memmap"]())
        for name, loop in loops.items():
            got = next(loop())
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), name
        rates: dict[str, list[float]] = {name: [] for name in loops}
        for _ in range(args.rounds):
            for name, loop in loops.items():
                rates[name].append(tokens_per_second(loop, args.batches))
    median = {name: statistics.median(r) for name, r in rates.items()}
    result: dict[str, Any] = {
        "command": "python benchmarks/data.py --json benchmarks/results/data_loader_cpu.json",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "tokens": args.tokens,
        "shard_tokens": args.shard_tokens,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "batches": args.batches,
        "workers": args.workers,
        "rounds": args.rounds,
        **{f"{name}_tokens_per_second": round(value) for name, value in median.items()},
        "ratio": round(median["apt_loader"] / median["plain_memmap"], 3),
        "ratio_to_in_memory": round(median["apt_loader"] / median["plain_in_memory"], 3),
        "rounds_tokens_per_second": {name: [round(v) for v in r] for name, r in rates.items()},
    }
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
