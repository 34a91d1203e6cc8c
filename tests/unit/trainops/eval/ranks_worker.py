"""One rank of test_ranks.py: evaluate this rank's share of a set, write what it got as JSON.

Run as ``python ranks_worker.py RANK WORLD STORE_FILE OUT_JSON``.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from tiny_lm import BigramLM, PatternText

from apt.trainops.engine.tasks import split_batch
from apt.trainops.eval import Evaluator, compute_metrics

VOCAB = 32


def main(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = BigramLM(vocab=VOCAB)
    data = PatternText(n=21, seq=12, vocab=VOCAB, seed=1)  # 21 rows: one rank gets a pad row
    table = torch.arange(VOCAB) % 3 + 1
    evaluated = Evaluator(model=model, eval_dataset=data, batch_size=4, token_bytes=table)
    # compute_metrics on this rank's rows only (0, 2, 4, ... or 1, 3, 5, ...).
    mine = [data[i] for i in range(rank, len(data), world)]
    ids, labels = split_batch(torch.utils.data.default_collate(mine))
    with torch.no_grad():
        own = compute_metrics(model(ids), labels, token_bytes=table)
    result = {"evaluator": evaluated.evaluate(), "compute_metrics": own}
    dist.destroy_process_group()
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
