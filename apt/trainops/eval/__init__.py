"""Evaluation: the validation loop and its metrics."""

from apt.trainops.eval.evaluator import Evaluator, compute_metrics, to_device

__all__ = ["Evaluator", "compute_metrics", "to_device"]
