"""Evaluation: the validation loop and its metrics (loss, perplexity, accuracy, entropy, bpb).

>>> Evaluator(model=model, eval_dataset=val, metrics=["accuracy", "perplexity"]).evaluate()
... # doctest: +SKIP
>>> compute_metrics(logits, labels, ["loss", "accuracy"])  # doctest: +SKIP

See ``docs/evaluation.md``.
"""

from apt.trainops.data.tokenizers import token_byte_lengths
from apt.trainops.eval.evaluator import Evaluator, to_device
from apt.trainops.eval.metrics import METRICS, compute_metrics, summarize
from apt.trainops.eval.padding import PaddedForRanks, pad_collate

__all__ = [
    "METRICS",
    "Evaluator",
    "PaddedForRanks",
    "compute_metrics",
    "pad_collate",
    "summarize",
    "to_device",
    "token_byte_lengths",
]
