"""``data prepare`` throughput: input MB/s with 1 and 2 workers, against the tokenizer alone.

The corpus is the running Python's standard library (``--mb`` MB of it), one ``.jsonl`` record
per file. For each tokenizer (``byte``, and the ``tokenizer.json`` given with ``--tokenizer``):

* ``prepare``: :func:`prepare_shards` into a fresh folder with 1, then 2 workers (best of
  ``--repeats``), wall time; and the same with the fixed cost taken out (the time the same call
  takes on a one-document input: process start of the workers, the tokenizer built, files
  created), which is the rate a long corpus sees;
* ``ceiling``: the tokenizer alone on the same texts already in memory, in a fresh process: for
  a ``tokenizer.json`` the ``tokenizers`` library's own ``Tokenizer.encode_batch`` with one
  thread (``RAYON_NUM_THREADS=1``, the per-worker ceiling) and with its default threads, 64
  documents a call; for ``byte`` its ``encode_array`` (UTF-8 encoding);
* ``cold_start_s``: ``python -m apt data prepare`` of a one-document input in a fresh process
  (imports, and for 2 workers the start of the forkserver, which imports torch once).

Per worker = rate / workers; scaling = 2-worker rate / 1-worker rate.

    python benchmarks/data_prepare.py --mb 30 [--tokenizer tok/tokenizer.json] \\
        [--out benchmarks/results/data_prepare_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from apt.trainops.data.corpus import python_stdlib_files
from apt.trainops.data.shards.prepare import prepare_shards


def write_corpus(folder: Path, megabytes: float) -> tuple[Path, int, int]:
    """The first ``megabytes`` of the stdlib as ``stdlib.jsonl``; (path, text bytes, docs)."""
    path, size, docs = folder / "stdlib.jsonl", 0, 0
    with open(path, "w", encoding="utf-8") as out:
        for file in python_stdlib_files():
            text = file.read_text(encoding="utf-8", errors="replace")
            out.write(json.dumps({"text": text}) + "\n")
            size += len(text.encode("utf-8"))
            docs += 1
            if size >= megabytes * 1e6:
                break
    return path, size, docs


def time_prepare(source: Path, spec: dict[str, Any], workers: int, repeats: int) -> float:
    """Best wall time of ``prepare_shards`` of ``source`` into a fresh folder."""
    best = float("inf")
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
        try:
            start = time.perf_counter()
            prepare_shards([str(source)], out / "shards", tokenizer_spec=spec, workers=workers)
            best = min(best, time.perf_counter() - start)
        finally:
            shutil.rmtree(out)
    return best


_CEILING = """
import json, sys, time
texts = [json.loads(line)["text"] for line in open(sys.argv[1], encoding="utf-8")]
repeats, result = int(sys.argv[3]), {}
if sys.argv[2] == "byte":
    from apt.trainops.data.tokenizers import ByteTokenizer
    tok = ByteTokenizer()
    ways = {"encode_array": lambda batch: [tok.encode_array(t) for t in batch]}
else:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(sys.argv[2])
    def batch_ids(method):
        return lambda batch: [e.ids for e in method(batch, add_special_tokens=False)]
    ways = {
        "encode_batch": batch_ids(tok.encode_batch),
        "encode_batch_fast": batch_ids(tok.encode_batch_fast),
    }
for name, encode in ways.items():
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(texts), 64):  # in batches: one batch of all would measure malloc
            encode(texts[i : i + 64])
        best = min(best, time.perf_counter() - start)
    result[name] = best
print(json.dumps(result))
"""


def ceiling(source: Path, tokenizer: str, threads: int | None, repeats: int) -> dict[str, Any]:
    """Seconds (best of ``repeats``) of the tokenizer alone on the texts of ``source``, in a
    fresh process, by each way of calling it."""
    env = dict(os.environ)
    if threads is not None:
        env["RAYON_NUM_THREADS"] = str(threads)
    proc = subprocess.run(
        [sys.executable, "-c", _CEILING, str(source), tokenizer, str(repeats)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return dict(json.loads(proc.stdout))


def cold_start(tiny: Path, spec: dict[str, Any], workers: int) -> float:
    """Wall time of the CLI on a one-document input, in a fresh process."""
    out = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    tokenizer = spec.get("path", spec["kind"])
    command = [sys.executable, "-m", "apt", "data", "prepare", "--input", str(tiny)]
    command += ["--output", str(out / "s"), "--tokenizer", tokenizer, "--workers", str(workers)]
    try:
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        return round(time.perf_counter() - start, 3)
    finally:
        shutil.rmtree(out)


def measure(
    name: str, spec: dict[str, Any], source: Path, tiny: Path, mb: float, repeats: int
) -> dict[str, Any]:
    result: dict[str, Any] = {"tokenizer": name, "spec": spec, "prepare": {}}
    result["cold_start_s"] = {str(w): cold_start(tiny, spec, w) for w in (1, 2)}
    print(f"{name}: cold start of the CLI (1, 2 workers): {result['cold_start_s']}")
    for workers in (1, 2):
        wall = time_prepare(source, spec, workers, repeats)
        fixed = time_prepare(tiny, spec, workers, repeats)
        steady = mb / max(wall - fixed, 1e-9)
        result["prepare"][str(workers)] = {
            "wall_s": round(wall, 3),
            "fixed_s": round(fixed, 3),
            "mb_per_s": round(mb / wall, 2),
            "mb_per_s_steady": round(steady, 2),
            "mb_per_s_per_worker_steady": round(steady / workers, 2),
        }
        print(f"{name}: prepare, {workers} worker(s): {result['prepare'][str(workers)]}")
    one, two = result["prepare"]["1"], result["prepare"]["2"]
    result["scaling_1_to_2"] = round(two["mb_per_s"] / one["mb_per_s"], 3)
    result["scaling_1_to_2_steady"] = round(two["mb_per_s_steady"] / one["mb_per_s_steady"], 3)
    target = "byte"
    if spec["kind"] != "byte":
        given = Path(spec["path"])
        target = str(given / "tokenizer.json" if given.is_dir() else given)
    result["ceiling"] = {}
    for label, threads in (("1_thread", 1), ("default_threads", None)):
        if spec["kind"] == "byte" and threads is None:
            continue  # encode_array has no threads
        seconds = ceiling(source, target, threads, 1)  # 1: keeps the run under 3 min
        result["ceiling"][label] = {
            way: {"seconds": round(t, 3), "mb_per_s": round(mb / t, 2)}
            for way, t in seconds.items()
        }
        print(f"{name}: ceiling, {label}: {result['ceiling'][label]}")
    way = "encode_array" if spec["kind"] == "byte" else "encode_batch"
    per_thread = result["ceiling"]["1_thread"][way]["mb_per_s"]
    result["steady_per_worker_vs_1_thread_" + way] = {
        w: round(result["prepare"][w]["mb_per_s_per_worker_steady"] / per_thread, 3)
        for w in ("1", "2")
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=30.0, help="MB of stdlib text to prepare")
    parser.add_argument("--tokenizer", help="a tokenizer.json (or its folder) to measure too")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the best counts")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        source, size, docs = write_corpus(work, args.mb)
        tiny = work / "tiny.jsonl"
        tiny.write_text(json.dumps({"text": "def f():\n    return 1\n"}) + "\n")
        mb = size / 1e6
        print(f"corpus: {mb:.1f} MB of stdlib text, {docs} documents, {os.cpu_count()} CPUs")
        specs: list[tuple[str, dict[str, Any]]] = [("byte", {"kind": "byte"})]
        if args.tokenizer:
            path = Path(args.tokenizer).resolve()
            specs.append(("bpe", {"kind": "bpe", "path": str(path)}))
        results = {
            "script": "benchmarks/data_prepare.py",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
            "corpus_mb": round(mb, 2),
            "documents": docs,
            "runs": [measure(n, s, source, tiny, mb, args.repeats) for n, s in specs],
        }
    finally:
        shutil.rmtree(work)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
