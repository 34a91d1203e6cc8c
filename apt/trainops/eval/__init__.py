"""Evaluation: the validation loop and its metrics."""

from apt.trainops.eval.evaluator import Evaluator, compute_metrics, to_device
from apt.trainops.eval.padding import PaddedForRanks

__all__ = ["Evaluator", "PaddedForRanks", "compute_metrics", "to_device"]
