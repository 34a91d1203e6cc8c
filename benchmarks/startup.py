"""How long importing APT takes beyond importing torch, in fresh interpreters.

Each round starts a new Python, times ``import torch`` and then the APT import named by
``--target`` inside it, and the medians over ``--rounds`` are printed. ``--importtime`` adds
the APT modules that cost the most, from ``python -X importtime`` (cumulative microseconds,
which that profiler inflates a little).

    python benchmarks/startup.py --rounds 7 --json benchmarks/results/startup_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
from datetime import date

TARGETS = {
    "trainer": "from apt import Trainer",
    "engine": "import apt.trainops.engine",
    "config": "from apt import load_profile",
}

TIMING_PROGRAM = """
import time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
{statement}
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""

IMPORTTIME_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def time_one_interpreter(statement: str) -> tuple[float, float]:
    program = TIMING_PROGRAM.format(statement=statement)
    out = subprocess.run(
        [sys.executable, "-c", program], check=True, capture_output=True, text=True
    ).stdout
    torch_s, apt_s = (float(x) for x in out.split())
    return torch_s, apt_s


def costliest_modules(statement: str, top: int) -> list[tuple[str, float]]:
    """The APT modules with the largest cumulative import time, in milliseconds."""
    err = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import torch\n{statement}"],
        check=True,
        capture_output=True,
        text=True,
    ).stderr
    rows = []
    for line in err.splitlines():
        match = IMPORTTIME_LINE.match(line)
        if match and match[4].startswith("apt"):
            rows.append((match[4], int(match[2]) / 1000))
    return sorted(rows, key=lambda row: -row[1])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=sorted(TARGETS), default="trainer")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--importtime", type=int, default=0, metavar="N", help="list N modules")
    parser.add_argument("--json", help="write the result to this file")
    args = parser.parse_args()

    statement = TARGETS[args.target]
    time_one_interpreter(statement)  # warm the file cache
    rounds = [time_one_interpreter(statement) for _ in range(args.rounds)]
    torch_s = statistics.median(r[0] for r in rounds)
    apt_s = statistics.median(r[1] for r in rounds)
    result = {
        "date": date.today().isoformat(),
        "python": platform.python_version(),
        "torch": _torch_version(),
        "statement": statement,
        "rounds": args.rounds,
        "import_torch_s": round(torch_s, 3),
        "apt_beyond_torch_s": round(apt_s, 3),
        "apt_beyond_torch_each_s": [round(r[1], 3) for r in rounds],
    }
    if args.importtime:
        result["costliest_modules_ms"] = costliest_modules(statement, args.importtime)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(f"import torch: {torch_s:.3f} s (median of {args.rounds} fresh interpreters)")
    print(f"{statement}: {apt_s:.3f} s beyond torch")
    for name, ms in result.get("costliest_modules_ms", []):
        print(f"  {ms:8.1f} ms  {name}")


def _torch_version() -> str:
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip()


if __name__ == "__main__":
    main()
