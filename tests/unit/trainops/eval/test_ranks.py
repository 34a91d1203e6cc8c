"""Two real gloo processes: each rank scores its share, and both get the metrics of the whole
set, as one process scoring everything does (the padding row of the odd set scores nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_lm import BigramLM, PatternText

from apt.trainops.engine.tasks import split_batch
from apt.trainops.eval import Evaluator, compute_metrics

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[3]
VOCAB = 32


@pytest.mark.distributed
def test_two_ranks_get_the_metrics_of_the_whole_set(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests" / "helpers")])
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "ranks_worker.py"),
                str(r),
                "2",
                str(tmp_path / "store"),
                str(outs[r]),
            ],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
    ranks = [json.loads(out.read_text()) for out in outs]

    torch.manual_seed(0)
    model = BigramLM(vocab=VOCAB)
    data = PatternText(n=21, seq=12, vocab=VOCAB, seed=1)
    table = torch.arange(VOCAB) % 3 + 1
    alone = Evaluator(model=model, eval_dataset=data, batch_size=4, token_bytes=table).evaluate()
    ids, labels = split_batch(torch.utils.data.default_collate([data[i] for i in range(21)]))
    with torch.no_grad():
        whole = compute_metrics(model(ids), labels, token_bytes=table)
    for got in ranks:
        assert got["evaluator"] == pytest.approx(alone, rel=1e-6)
        assert got["compute_metrics"] == pytest.approx(whole, rel=1e-6)
    assert ranks[0] == ranks[1]  # every rank gets the same numbers
