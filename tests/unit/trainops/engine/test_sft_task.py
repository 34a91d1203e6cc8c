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
from apt.trainops.data.sft import PackedSFTDataset, SFTDataset, build_sft_datasets
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


def _data(path: Path, *, packing: bool) -> DataConfig:
    return DataConfig(source={"kind": "sft", "path": str(path), "packing": packing}, seq_len=SEQ)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, max_seq_len=SEQ)
    )
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
    with pytest.raises(ConfigError, match="packing is on but the model's forward takes no"):
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
