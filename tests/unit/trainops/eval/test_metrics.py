"""compute_metrics and summarize: hand-computed values, ignored targets, names and errors."""

from __future__ import annotations

import math

import pytest
import torch

from apt.core.errors import ConfigError
from apt.trainops.eval import METRICS, compute_metrics, summarize


def test_compute_metrics_matches_a_hand_computation() -> None:
    # Two scored positions: a confident hit and an even miss between two of three classes.
    logits = torch.tensor([[[math.log(8.0), 0.0, 0.0], [0.0, 0.0, -1e9]]])  # (1, 2, 3)
    labels = torch.tensor([[0, 1]])
    got = compute_metrics(logits, labels)
    p_hit = 8 / 10  # softmax of (ln 8, 0, 0) at class 0
    nll = [-math.log(p_hit), -math.log(0.5)]
    h_hit = -(p_hit * math.log(p_hit) + 2 * 0.1 * math.log(0.1))
    assert list(got) == ["loss", "perplexity", "accuracy", "entropy"]
    assert got["loss"] == pytest.approx(sum(nll) / 2, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(sum(nll) / 2), rel=1e-6)
    # The tie (0, 0, -inf) goes to the first class, 0, not the label 1.
    assert got["accuracy"] == 0.5
    assert got["entropy"] == pytest.approx((h_hit + math.log(2)) / 2, rel=1e-6)


def test_ignored_targets_count_for_nothing() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    padded = labels.clone()
    padded[1, 2:] = -100
    keep = padded != -100
    whole = compute_metrics(logits[keep], labels[keep])  # only the kept rows, (n, V) and (n,)
    assert compute_metrics(logits, padded) == pytest.approx(whole, rel=1e-12)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 7), padded.reshape(-1))
    assert whole["loss"] == pytest.approx(float(loss), rel=1e-6)
    other = padded.masked_fill(~keep, 7)  # another marker for the same positions
    assert compute_metrics(logits, other, ignore_index=7) == compute_metrics(logits, padded)


def test_metrics_are_chosen_and_ordered_by_name() -> None:
    logits, labels = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    got = compute_metrics(logits, labels, ["accuracy", "loss"])
    assert list(got) == ["accuracy", "loss"]
    assert compute_metrics(logits, labels, "entropy").keys() == {"entropy"}


def test_an_unknown_metric_names_the_nearest_and_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        compute_metrics(torch.randn(2, 3), torch.tensor([0, 1]), ["acuracy"])
    message = str(err.value)
    assert "unknown metric 'acuracy'" in message and "Did you mean 'accuracy'?" in message
    assert f"Valid metrics: {', '.join(METRICS)}" in message


def test_bpb_needs_token_bytes_and_shapes_must_match() -> None:
    with pytest.raises(ConfigError, match="token_bytes=token_byte_lengths"):
        compute_metrics(torch.randn(2, 3), torch.tensor([0, 1]), ["bpb"])
    with pytest.raises(ValueError, match=r"expected labels \(2,\)"):
        compute_metrics(torch.randn(2, 3), torch.tensor([[0, 1]]))


def test_no_scored_target_gives_no_metrics() -> None:
    assert compute_metrics(torch.randn(3, 4), torch.full((3,), -100)) == {}


def test_summarize_divides_the_sums_once() -> None:
    sums = {"loss": 6.0, "targets": 4.0, "bytes": 8.0, "accuracy": 3.0, "entropy": 2.0}
    assert summarize(sums, prefix="val_") == {
        "val_loss": 1.5,
        "val_perplexity": math.exp(1.5),
        "val_bpb": 6.0 / 8.0 / math.log(2),
        "val_accuracy": 0.75,
        "val_entropy": 0.5,
    }
    assert summarize(sums, ["entropy", "loss"]) == {"entropy": 0.5, "loss": 1.5}
    assert "perplexity" not in summarize(sums, perplexity=False)
    with pytest.raises(ConfigError, match="reports no 'voter_fired' total"):
        summarize(sums, ["voter_fired"])
    assert summarize({"loss": 0.0, "targets": 0.0}) == {}
