"""The ``sft`` task: the loss of packed rows equals that of the same examples one a row, only
completion tokens are targets, and the engine's loaders batch with the task's collate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_lm import BigramLM

from apt.core.config import DataConfig, ModelConfig, TaskSpec
from apt.core.errors import ConfigError
from apt.model import build_model
from apt.trainops.data.sft import PackedSFTDataset, SFTDataset, build_sft_datasets, join_collate
from apt.trainops.engine.builders import build_loaders
from apt.trainops.engine.tasks import SFTTask, TrainingTask, build_task
from apt.trainops.eval import pad_collate

SEQ = 256


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    records: list[dict[str, Any]] = []
    for i in range(24):
        if i % 3:
            records.append(
                {"prompt": f"What is {i} + {i}?", "completion": f" {2 * i}" * (1 + i % 4)}
            )
        else:
            chat = [
                {"role": "system", "content": "Answer in words."},
                {"role": "user", "content": f"Name {i}."},
                {"role": "assistant", "content": f"{i} is {'odd' if i % 2 else 'even'}."},
                {"role": "user", "content": "Again?"},
                {"role": "assistant", "content": "Yes."},
            ]
            records.append({"messages": chat})
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _data(path: Path, *, packing: bool, padding_free: bool = False) -> DataConfig:
    source = {"kind": "sft", "path": str(path), "packing": packing, "padding_free": padding_free}
    return DataConfig(source=source, seq_len=SEQ)


def _model(document_attention: str = "auto", max_seq_len: int = SEQ) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=256,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        max_seq_len=max_seq_len,
        document_attention=document_attention,
    )
    model = build_model(config)
    with torch.no_grad():  # sharper attention than at init: leaks across examples would show
        for name, weight in model.named_parameters():
            if "attn" in name:
                weight.mul_(4)
    return model.eval()


def _all(dataset: Any, collate: Any) -> Any:
    return collate([dataset[i] for i in range(len(dataset))])


def test_sft_is_a_registered_task_with_a_collate() -> None:
    task = build_task(TaskSpec(kind="sft"))
    assert isinstance(task, SFTTask) and task.loss_is_cross_entropy
    assert task.collate() is pad_collate
    assert TrainingTask().collate() is None  # other tasks keep default_collate


def test_packed_rows_score_exactly_the_examples_one_a_row(examples: Path) -> None:
    task = SFTTask()
    packed, _ = task.build_datasets(_data(examples, packing=True), seed=0)
    single, _ = task.build_datasets(_data(examples, packing=False), seed=0)
    assert isinstance(packed, PackedSFTDataset) and isinstance(single, SFTDataset)
    assert len(packed) < len(single)  # packing put several examples in a row
    collate = task.collate()
    packed_batch, single_batch = _all(packed, collate), _all(single, collate)
    assert packed_batch["input_ids"].shape == (len(packed), SEQ)
    assert single_batch["input_ids"].shape[1] < SEQ  # padded to the longest example only
    # The same targets: the completion tokens, counted once each.
    targets = task.count_targets(packed_batch)
    assert targets == task.count_targets(single_batch) == packed.num_targets
    model, criterion = _model(), task.build_criterion()
    with torch.no_grad():
        loss_packed = task.train_step(model, packed_batch, criterion).loss
        loss_single = task.train_step(model, single_batch, criterion).loss
        out = task.validation_step(model, packed_batch, criterion)
    assert abs(loss_packed.item() - loss_single.item()) < 1e-5, (loss_packed, loss_single)
    assert abs(out.loss.item() - loss_packed.item()) < 1e-5
    # Without the document ids the examples of a row would see each other: another loss.
    with torch.no_grad():
        leaky = model(packed_batch["input_ids"], targets=packed_batch["labels"]).loss
    assert abs(leaky.item() - loss_packed.item()) > 1e-3, (leaky, loss_packed)


def test_only_completion_tokens_are_targets(examples: Path) -> None:
    bundle = build_sft_datasets(_data(examples, packing=False), seed=0)
    tokenizer = bundle.tokenizer
    for i in range(len(bundle.train)):
        row = bundle.train[i]
        targets = tokenizer.decode(row["labels"][row["labels"] != -100].tolist())
        assert "<|user|>" not in targets and "<|system|>" not in targets and "?" not in targets
        assert targets.endswith("<|end|>\x00")
    assert SFTTask().count_targets(_all(bundle.train, pad_collate)) == bundle.train_stats.targets


def test_packed_rows_need_a_model_that_takes_document_ids(examples: Path) -> None:
    task = SFTTask()
    packed, _ = task.build_datasets(_data(examples, packing=True), seed=0)
    batch = _all(packed, task.collate())
    with pytest.raises(
        ConfigError, match=r"packing \(or padding_free\) is on but the model's forward takes no"
    ):
        task.train_step(BigramLM(vocab=256), batch, task.build_criterion())


def test_the_task_needs_an_sft_source() -> None:
    with pytest.raises(ConfigError, match=r"training.task: sft reads data.source: \{kind: sft"):
        SFTTask().build_datasets(DataConfig(), seed=0)


class _OneRank:
    def sampler_rank_world(self) -> tuple[int, int]:
        return 0, 1


def test_the_engine_loaders_batch_with_the_task_collate(examples: Path) -> None:
    task = SFTTask()
    train, val = build_loaders(
        _data(examples, packing=False),
        task=task,
        strategy=_OneRank(),  # type: ignore[arg-type]
        batch_size=4,
        eval_batch_size=8,
        seed=0,
    )
    batch = next(iter(train))
    lengths = (batch["labels"] != -100).sum(1)
    assert batch["input_ids"].shape[0] == 4 and (lengths > 0).all()
    assert "attention_mask" in batch or batch["input_ids"].shape[1] <= SEQ
    assert len(val.dataset) == 1  # 5% of 24 examples, held out with the seed


@pytest.mark.parametrize("kernel", ["varlen", "mask"])
def test_a_padding_free_batch_scores_what_the_padded_batch_does(
    examples: Path, kernel: str
) -> None:
    """The examples of a batch in one row of their total length (no padding): the same loss,
    targets and gradients as the same examples padded one a row."""
    task = SFTTask()
    data = _data(examples, packing=False, padding_free=True)
    dataset, _ = task.build_datasets(data, seed=0)
    assert isinstance(dataset, SFTDataset)
    assert task.collate(data) is join_collate
    assert task.collate(_data(examples, packing=False)) is pad_collate
    samples = [dataset[i] for i in range(8)]
    joined, padded = join_collate(samples), pad_collate(samples)
    total = sum(len(s["input_ids"]) for s in samples)
    assert joined["input_ids"].shape == joined["document_ids"].shape == (1, total)
    assert padded["input_ids"].numel() > total  # the padded batch computes padding
    assert joined["document_ids"][0, -1].item() == 7
    assert task.count_targets(joined) == task.count_targets(padded)
    criterion = task.build_criterion()
    losses, grads = [], []
    for batch in (joined, padded):
        model = _model(kernel).train()
        loss = task.train_step(model, batch, criterion).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert abs(losses[0] - losses[1]) < 1e-5, losses
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=0, atol=1e-5, msg=name)
    # Without the document ids the examples would see each other: another loss (the same
    # weights; the longer RoPE table only lets the whole row through as one sequence).
    with torch.no_grad():
        leaky = _model(kernel, max_seq_len=total)(joined["input_ids"], targets=joined["labels"])
    assert leaky.loss is not None
    leaky = leaky.loss
    assert abs(leaky.item() - losses[0]) > 1e-3, (leaky, losses)


def test_padding_free_and_packing_are_two_layouts(examples: Path) -> None:
    with pytest.raises(ValueError, match="padding_free joins a micro-batch's examples"):
        _data(examples, packing=True, padding_free=True)
    # packing left at its default: padding_free takes examples one by one.
    source = {"kind": "sft", "path": str(examples), "padding_free": True}
    dataset, _ = SFTTask().build_datasets(DataConfig(source=source, seq_len=SEQ), seed=0)
    assert isinstance(dataset, SFTDataset)


def test_join_collate_refuses_packed_rows(examples: Path) -> None:
    packed, _ = SFTTask().build_datasets(_data(examples, packing=True), seed=0)
    with pytest.raises(ValueError, match=r"sample 0 is a packed row; set data\.source\.packing"):
        join_collate([packed[0], packed[1]])
