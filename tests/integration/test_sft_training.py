"""``training.task: sft`` end to end: the Trainer fine-tunes a tiny model on a jsonl of examples,
the completion loss of held-out examples falls, and a resumed run ends where an uninterrupted
one does."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from apt.core.config import APTConfig, load_profile
from apt.trainops.data.sft import PackedSFTDataset, SFTDataset
from apt.trainops.engine import Trainer

SEQ = 128
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "fish"]


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 examples: repeat two words back (prompt/completion or a chat)."""
    rng = random.Random(0)
    lines = []
    for i in range(240):
        a, b = rng.choice(WORDS), rng.choice(WORDS)
        if i % 2:
            lines.append({"prompt": f"say {a} {b}", "completion": f"{a} {b}"})
        else:
            turns = [{"role": "user", "content": f"say {a} {b}"}]
            lines.append({"messages": [*turns, {"role": "assistant", "content": f"{a} {b}"}]})
    path = tmp_path_factory.mktemp("sft") / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def _config(examples: Path, tmp_path: Path, *extra: str) -> APTConfig:
    return load_profile(
        "cpu/tiny",
        overrides=[
            "training.task=sft",
            f"data.source={{kind: sft, path: {examples}, val_fraction: 0.1}}",
            "data.max_corpus_bytes=null",  # cpu/tiny caps its text; sft reads its own file
            f"data.seq_len={SEQ}",
            f"model.max_seq_len={SEQ}",
            f"artifacts.output_dir={tmp_path}",
            *extra,
        ],
    )


def test_fine_tuning_lowers_the_completion_loss_of_held_out_examples(
    examples: Path, tmp_path: Path
) -> None:
    trainer = Trainer.from_config(_config(examples, tmp_path, "training.max_steps=30"))
    train, val = trainer.train_loader.dataset, trainer.eval_loader.dataset
    assert isinstance(train, PackedSFTDataset) and isinstance(val, PackedSFTDataset)
    assert len(val.examples) == 24  # 10% of 240 held out
    batch = next(iter(trainer.train_loader))
    assert batch["document_ids"].shape == (8, SEQ) and int(batch["document_ids"].max()) >= 2
    m = trainer.train().metrics
    assert m["val_loss_final"] < m["val_loss_initial"] - 1.0, m


def test_one_example_a_row_trains_too(examples: Path, tmp_path: Path) -> None:
    cfg = _config(
        examples,
        tmp_path,
        f"data.source={{kind: sft, path: {examples}, packing: false}}",
        "training.max_steps=4",
        "eval.interval=4",
    )
    trainer = Trainer.from_config(cfg)
    assert isinstance(trainer.train_loader.dataset, SFTDataset)
    batch = next(iter(trainer.train_loader))
    assert "document_ids" not in batch and batch["input_ids"].shape[1] < SEQ  # padded to longest
    assert torch.isfinite(torch.tensor(trainer.train().metrics["val_loss_final"]))


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
    examples: Path, tmp_path: Path
) -> None:
    def run(name: str, steps: int, trained: int) -> Trainer:
        sets = [f"training.max_steps={steps}", f"artifacts.experiment_name={name}"]
        trainer = Trainer.from_config(_config(examples, tmp_path, *sets, "eval.interval=100"))
        assert trainer.train().steps_run == trained
        return trainer

    golden = run("golden", 10, 10)
    run("split", 5, 5)
    resumed = run("split", 10, 5)  # resumes from step 5, mid-epoch (an epoch is 13 steps)
    assert resumed.state.global_step == 10
    got = resumed.strategy.unwrap(resumed.model).state_dict()
    for key, value in golden.strategy.unwrap(golden.model).state_dict().items():
        assert torch.equal(got[key], value), key


def _train_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r["train_loss"] for r in map(json.loads, lines) if r.get("train_loss") is not None]


def test_padding_free_batches_train_as_padded_ones_do(examples: Path, tmp_path: Path) -> None:
    """The same examples in the same order, joined into one row a batch (no padding) or padded
    one a row: the same losses step by step (fp32 round-off of another summation order)."""
    runs = {}
    for name, padding_free in (("padded", "false"), ("padding_free", "true")):
        source = f"{{kind: sft, path: {examples}, packing: false, padding_free: {padding_free}}}"
        cfg = _config(
            examples,
            tmp_path,
            f"data.source={source}",
            "training.max_steps=6",
            "eval.interval=100",
            f"artifacts.experiment_name={name}",
        )
        trainer = Trainer.from_config(cfg)
        batch = next(iter(trainer.train_loader))
        runs[name] = (batch, trainer.train())
    joined, padded = runs["padding_free"][0], runs["padded"][0]
    assert joined["input_ids"].shape[0] == 1 and "document_ids" in joined
    assert joined["input_ids"].numel() < padded["input_ids"].numel()  # no padding computed
    losses = {name: _train_losses(result.run_dir) for name, (_, result) in runs.items()}
    assert len(losses["padded"]) == 6 and losses["padded"][-1] < losses["padded"][0]
    for step, (a, b) in enumerate(zip(losses["padding_free"], losses["padded"], strict=True)):
        assert abs(a - b) < 1e-5, (step + 1, a, b)
