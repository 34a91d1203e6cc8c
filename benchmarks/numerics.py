"""Numerics of a lever: the step-by-step training loss of a profile on its real text, with and
without the lever, beside the noise floor (the same configuration run twice).

Every run starts from the same seed, sees the same batches in the same order and logs its loss
at every step. A lever that only changes how the step is computed (fusion, CUDA graphs, the
order of a reduction) should stay within a small multiple of the noise floor; a lever that
changes the arithmetic (FP8) within the tolerance stated beside it.

    python benchmarks/numerics.py --steps 200 --lever training.float8=tensorwise \
        --json benchmarks/results/numerics_h200.json
    python benchmarks/numerics.py --device cpu --profile cpu/tiny --steps 20 --no-compile
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from apt.core.config import load_profile
from apt.trainops.engine import Callback, Control, RunState, Trainer


class LossRecorder(Callback):
    """Every step's training loss (one device read per step: this is not a speed run)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step_end(self, state: RunState, control: Control) -> None:
        self.losses.append(float(state.last_loss))


def run(args: argparse.Namespace, lever: list[str]) -> list[float]:
    out = tempfile.mkdtemp(prefix="apt-numerics-")
    overrides = [
        f"training.max_steps={args.steps}",
        f"training.device={args.device}",
        f"training.compile={str(args.compile).lower()}",
        "training.auto_resume=false",
        "training.checkpoints.save_interval=null",
        "eval.interval=null",
        "eval.at_start=false",
        "monitoring.progress_bar=false",
        f"artifacts.output_dir={out}",
        "artifacts.save_final_model=false",
        *args.set,
        *lever,
    ]
    recorder = LossRecorder()
    trainer = Trainer.from_config(
        load_profile(args.profile, overrides=overrides), callbacks=[recorder]
    )
    trainer.train()
    trainer.close()
    return recorder.losses


def compare(reference: list[float], other: list[float]) -> dict[str, float]:
    diffs = [abs(a - b) for a, b in zip(reference, other, strict=True)]
    relative = [d / abs(a) for d, a in zip(diffs, reference, strict=True)]
    tail = max(1, len(diffs) // 4)
    return {
        "max_abs_diff": round(max(diffs), 5),
        "max_rel_diff": round(max(relative), 5),
        "mean_abs_diff_last_quarter": round(sum(diffs[-tail:]) / tail, 5),
        "final_loss": round(other[-1], 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="standard")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument(
        "--set", action="append", default=[], help="KEY=VALUE for every run (repeatable)"
    )
    parser.add_argument(
        "--lever",
        action="append",
        default=[],
        type=lambda text: text.split(","),
        help="KEY=VAL[,KEY=VAL]: one lever set compared with the baseline (repeatable)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    reference = run(args, [])
    results: dict[str, Any] = {
        "profile": args.profile,
        "steps": args.steps,
        "set": args.set,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "baseline_losses": [round(x, 5) for x in reference],
        "noise_floor": compare(reference, run(args, [])),
        "levers": {},
    }
    print(f"noise floor (baseline twice): {results['noise_floor']}")
    for lever in args.lever:
        losses = run(args, lever)
        name = ",".join(lever)
        results["levers"][name] = {**compare(reference, losses), "losses": losses}
        shown = {k: v for k, v in results["levers"][name].items() if k != "losses"}
        print(f"{name}: {shown}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
