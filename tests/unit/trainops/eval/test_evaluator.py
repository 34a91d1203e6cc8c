"""Evaluator: the seed call, names and prefix, batching, exact sums, errors, the reduce hook."""

from __future__ import annotations

import pytest
import torch
from tiny_lm import BigramLM, PatternText
from torch.utils.data import DataLoader, default_collate

from apt.core.errors import ConfigError
from apt.trainops.data import create_dataloader
from apt.trainops.engine.tasks import CausalLMTask, RegressionTask, split_batch
from apt.trainops.eval import Evaluator, compute_metrics

VOCAB = 32


@pytest.fixture
def model() -> BigramLM:
    torch.manual_seed(0)
    return BigramLM(vocab=VOCAB)


@pytest.fixture
def data() -> PatternText:
    return PatternText(n=21, seq=12, vocab=VOCAB, seed=1)  # rows padded to random lengths


def reference(model: torch.nn.Module, samples: list, names: list[str]) -> dict[str, float]:
    """compute_metrics over every sample at once: what the Evaluator must reproduce."""
    ids, labels = split_batch(default_collate(samples))
    with torch.no_grad():
        return compute_metrics(model(ids), labels, names)


def test_the_seed_call_returns_exactly_the_metrics_asked_for(
    model: BigramLM, data: PatternText
) -> None:
    got = Evaluator(model=model, eval_dataset=data, metrics=["accuracy", "perplexity"]).evaluate()
    assert got is not None and list(got) == ["accuracy", "perplexity"]
    want = reference(model, [data[i] for i in range(len(data))], ["accuracy", "perplexity"])
    assert got == pytest.approx(want, rel=1e-6)


def test_every_metric_with_the_trainers_prefix(model: BigramLM, data: PatternText) -> None:
    loader = create_dataloader(data, batch_size=4, shuffle=False, drop_last=False, num_workers=0)
    got = Evaluator(model=model, dataloader=loader, task=CausalLMTask(), prefix="val_").evaluate()
    assert got is not None
    assert list(got) == ["val_loss", "val_perplexity", "val_accuracy", "val_entropy"]
    want = reference(model, [data[i] for i in range(len(data))], ["loss", "accuracy", "entropy"])
    assert got["val_loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert got["val_accuracy"] == pytest.approx(want["accuracy"], rel=1e-12)
    assert got["val_entropy"] == pytest.approx(want["entropy"], rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_the_batch_size_does_not_change_the_metrics(
    model: BigramLM, data: PatternText, batch_size: int
) -> None:
    base = Evaluator(model=model, eval_dataset=data).evaluate()
    got = Evaluator(model=model, eval_dataset=data, batch_size=batch_size).evaluate()
    assert got == pytest.approx(base, rel=1e-6)


def test_max_batches_scores_the_first_batches_only(model: BigramLM, data: PatternText) -> None:
    got = Evaluator(model=model, eval_dataset=data, batch_size=4, max_batches=2).evaluate()
    want = reference(model, [data[i] for i in range(8)], ["loss", "accuracy"])
    assert got is not None
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert got["accuracy"] == pytest.approx(want["accuracy"], rel=1e-12)


def test_rows_of_unequal_length_are_padded_with_ignored_targets(model: BigramLM) -> None:
    rows = [torch.arange(n) % VOCAB for n in (3, 9, 6, 12)]
    dataset = [{"input_ids": row} for row in rows]
    got = Evaluator(model=model, eval_dataset=dataset, batch_size=4).evaluate()
    # One row at a time needs no padding: the reference.
    one = Evaluator(model=model, eval_dataset=dataset, batch_size=1).evaluate()
    assert got == pytest.approx(one, rel=1e-6)
    targets = sum(len(row) - 1 for row in rows)
    with torch.no_grad():
        nll = sum(
            float(torch.nn.functional.cross_entropy(model(r[None, :-1])[0], r[1:], reduction="sum"))
            for r in rows
        )
    assert got is not None and got["loss"] == pytest.approx(nll / targets, rel=1e-6)


def test_exactly_one_source_of_batches(model: BigramLM, data: PatternText) -> None:
    with pytest.raises(ConfigError, match=r"exactly one of eval_dataset= .* both was given"):
        Evaluator(model=model, eval_dataset=data, dataloader=DataLoader(data))
    with pytest.raises(ConfigError, match="neither was given"):
        Evaluator(model=model)


def test_metric_names_are_checked_before_anything_runs(model: BigramLM, data: PatternText) -> None:
    with pytest.raises(
        ConfigError, match=r"unknown metric 'perplexty'\. Did you mean 'perplexity'"
    ):
        Evaluator(model=model, eval_dataset=data, metrics=["loss", "perplexty"])
    with pytest.raises(ConfigError, match="'bpb' needs token_bytes"):
        Evaluator(model=model, eval_dataset=data, metrics=["bpb"])
    regression = torch.nn.Linear(16, 1)
    xy = [(torch.randn(16), torch.randn(1)) for _ in range(4)]
    with pytest.raises(ConfigError, match="'perplexity' needs a cross-entropy loss"):
        Evaluator(model=regression, eval_dataset=xy, task=RegressionTask(), metrics=["perplexity"])
    with pytest.raises(ConfigError, match="RegressionTask does not"):
        Evaluator(
            model=regression, eval_dataset=xy, task=RegressionTask(), token_bytes=torch.ones(4)
        )


def test_a_regression_task_reports_its_loss_and_refuses_accuracy() -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(16, 1)
    xy = [(torch.randn(16), torch.randn(1)) for _ in range(6)]
    got = Evaluator(model=net, eval_dataset=xy, task=RegressionTask(), batch_size=4).evaluate()
    with torch.no_grad():
        mse = torch.nn.functional.mse_loss(
            net(torch.stack([x for x, _ in xy])), torch.stack([y for _, y in xy])
        )
    assert got == pytest.approx({"loss": float(mse)}, rel=1e-6)
    ask = Evaluator(model=net, eval_dataset=xy, task=RegressionTask(), metrics=["accuracy"])
    with pytest.raises(ConfigError, match="reports no 'accuracy' total"):
        ask.evaluate()


def test_one_reduce_carries_every_sum(model: BigramLM, data: PatternText) -> None:
    calls: list[torch.Tensor] = []

    def two_identical_ranks(packed: torch.Tensor) -> torch.Tensor:
        calls.append(packed.clone())
        return packed * 2  # every sum doubled: ratios, hence metrics, unchanged

    alone = Evaluator(model=model, eval_dataset=data).evaluate()
    got = Evaluator(model=model, eval_dataset=data, reduce=two_identical_ranks).evaluate()
    assert len(calls) == 1 and calls[0].dtype == torch.float64
    assert calls[0].numel() == 4  # accuracy, entropy, loss, targets
    assert got == pytest.approx(alone, rel=1e-12)


def test_mode_and_device_and_stop(model: BigramLM, data: PatternText) -> None:
    model.train()
    evaluator = Evaluator(model=model, eval_dataset=data)
    assert evaluator.device == torch.device("cpu")  # the model's
    assert evaluator.evaluate(stop=lambda: True) is None
    assert model.training  # put back after the evaluation, abandoned or not
    assert (
        Evaluator(model=model, eval_dataset=[{"input_ids": torch.zeros(1).long()}]).evaluate() == {}
    )
