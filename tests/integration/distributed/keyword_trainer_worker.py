"""One rank of the keyword-construction test: ``Trainer(model=..., distributed_config=...)``.

Started by torchrun (2 ranks, gloo). The user's own model and dataset, no profile: the
Trainer sets up the process group, shards the model with FSDP2 and trains. Rank 0 prints one
JSON line of what it saw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_workload as wl

from apt.trainops.distributed import exit_process, teardown_distributed
from apt.trainops.engine import Trainer


class Arithmetic(Dataset[dict[str, torch.Tensor]]):
    """Arithmetic token sequences (something learnable), as ``{"input_ids": ...}``."""

    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(0)
        start = torch.randint(0, wl.VOCAB, (n, 1), generator=gen)
        stride = torch.randint(1, 4, (n, 1), generator=gen)
        self.ids = (start + stride * torch.arange(wl.SEQ)) % wl.VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}


def main() -> None:
    out = Path(sys.argv[1])
    trainer = Trainer(
        model=wl.make_model(0),
        train_dataset=Arithmetic(256),
        distributed_config={"strategy": "fsdp", "backend": "gloo"},
        max_steps=30,
        batch_size=8,
        learning_rate=1e-2,
        device="cpu",
        output_dir=str(out),
        experiment_name="keywords",
    )
    result = trainer.train()
    if trainer.env.is_main:
        losses = [
            json.loads(line)["train_loss"]
            for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
            if "train_loss" in line
        ]
        params = list(trainer.model.parameters())
        print(
            json.dumps(
                {
                    "world_size": trainer.env.world_size,
                    "strategy": trainer.strategy.name,
                    "sharded": all(isinstance(p, DTensor) for p in params),
                    "global_step": result.global_step,
                    "first_loss": losses[0],
                    "last_loss": losses[-1],
                    "checkpoint": sorted(
                        p.name for p in (result.run_dir / "checkpoints").glob("step-*/model/*")
                    ),
                }
            )
        )
    teardown_distributed()
    exit_process(0)  # gloo can abort in finalization (see exit_process)


if __name__ == "__main__":
    main()
