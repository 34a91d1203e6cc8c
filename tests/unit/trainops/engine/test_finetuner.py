"""``Finetuner``'s entry points and ``finetune.base_model``: the sft task by default, examples
as a file or as records, the model's own config and tokenizer taken for the run, and a clear
error for each mismatch (another network, another tokenizer, rows longer than the model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from apt.cli.main import main
from apt.core.config import ModelConfig, load_profile
from apt.core.errors import ConfigError, DataError
from apt.model import APTModel
from apt.model.tokenizers import ByteTokenizer
from apt.trainops.data.sft import PackedSFTDataset, parse_example
from apt.trainops.engine import Finetuner

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "theta", "kappa", "lambda", "zeta"]
RECORDS = [{"prompt": f"Say {w}", "completion": w} for w in WORDS]


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A small byte-level APT model saved with its tokenizer (max_seq_len 96)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, max_seq_len=96)
    model = APTModel(cfg)
    model.tokenizer = ByteTokenizer()
    return model.save_pretrained(tmp_path / "base")


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return path


def _keywords(tmp_path: Path, **extra: object) -> dict[str, object]:
    keywords = {"num_epochs": 2, "batch_size": 4, "learning_rate": 3e-3, "device": "cpu"}
    return {**keywords, "output_dir": str(tmp_path / "runs"), **extra}


def test_a_file_of_examples_becomes_the_configs_sft_source(
    tmp_path: Path, saved: Path, examples: Path
) -> None:
    model = APTModel.from_pretrained(saved)
    finetuner = Finetuner(model=model, train_dataset=str(examples), **_keywords(tmp_path))
    cfg = finetuner.config
    assert cfg.training.task.kind == "sft"
    assert cfg.data.source.kind == "sft" and cfg.data.source.path == str(examples)
    assert cfg.model == model.config  # the run folder records the network that trains
    assert cfg.data.seq_len == 96  # the default 128 shrinks to the model's positions
    result = finetuner.finetune()
    assert result.global_step == 4  # 9 rows, 2 batches of 4 an epoch (the last row dropped)
    assert result.metrics["val_loss_final"] < result.metrics["val_loss_initial"]


def test_records_in_memory_train_like_the_same_file(
    tmp_path: Path, saved: Path, examples: Path
) -> None:
    from_file = Finetuner(
        model=APTModel.from_pretrained(saved),
        train_dataset=str(examples),
        **_keywords(tmp_path, experiment_name="file"),
    )
    from_records = Finetuner(
        model=APTModel.from_pretrained(saved),
        train_dataset=RECORDS,
        **_keywords(tmp_path, experiment_name="records"),
    )
    assert isinstance(from_records.train_loader.dataset, PackedSFTDataset)
    rows = [from_file.train_loader.dataset[i] for i in range(len(from_file.train_loader.dataset))]
    again = [from_records.train_loader.dataset[i] for i in range(len(rows))]
    assert len(from_records.train_loader.dataset) == len(rows)
    for a, b in zip(rows, again, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    a, b = from_file.finetune(), from_records.finetune()
    assert a.metrics["train_loss"] == b.metrics["train_loss"]


def test_a_bad_record_names_its_index_and_the_fix(tmp_path: Path, saved: Path) -> None:
    bad = [*RECORDS[:3], {"prompt": "no completion"}]
    with pytest.raises(DataError, match=r"train_dataset\[3\]"):
        Finetuner(model=APTModel.from_pretrained(saved), train_dataset=bad, **_keywords(tmp_path))
    with pytest.raises(DataError, match=r"eval_dataset\[0\]: a str, not an object"):
        parse_example("text", where="eval_dataset[0]")


def test_mixed_example_kinds_are_refused(tmp_path: Path, saved: Path, examples: Path) -> None:
    model = APTModel.from_pretrained(saved)
    with pytest.raises(ConfigError, match="validation examples as a file too"):
        Finetuner(model=model, train_dataset=str(examples), eval_dataset=RECORDS)
    with pytest.raises(ConfigError, match="without train_dataset"):
        Finetuner(model=model, eval_dataset=str(examples))


def test_base_model_replaces_the_model_section_and_clashes_are_named(
    tmp_path: Path, saved: Path, examples: Path
) -> None:
    overrides = [f"finetune.base_model={saved}", f"data.source.path={examples}"]
    overrides += [f"artifacts.output_dir={tmp_path}", "data.seq_len=64"]
    finetuner = Finetuner.from_config(load_profile("cpu/finetune_tiny", overrides=overrides))
    assert finetuner.config.model.hidden_size == 32
    assert finetuner.config.model.max_seq_len == 96

    clash = load_profile("cpu/finetune_tiny", overrides=[*overrides, "model.hidden_size=48"])
    with pytest.raises(ConfigError, match=r"model\.hidden_size: 48 \(the base model has 32\)"):
        Finetuner.from_config(clash)
    too_long = load_profile("cpu/finetune_tiny", overrides=[*overrides, "data.seq_len=200"])
    with pytest.raises(ConfigError, match=r"data\.seq_len: 200 is longer than the 96 positions"):
        Finetuner.from_config(too_long)
    both = load_profile("cpu/finetune_tiny", overrides=overrides)
    with pytest.raises(ConfigError, match="a model was passed too"):
        Finetuner.from_config(both, model=APTModel.from_pretrained(saved))


def test_data_read_with_another_tokenizer_than_the_models_is_refused(
    tmp_path: Path, saved: Path, examples: Path
) -> None:
    from apt.trainops.data.bpe import train_bpe

    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS * 200), encoding="utf-8")
    bpe = train_bpe([str(text)], vocab_size=300, output=tmp_path / "tok")
    overrides = [f"finetune.base_model={saved}", f"data.source.path={examples}"]
    overrides += ["data.seq_len=64", f"data.tokenizer={{kind: bpe, path: {bpe}}}"]
    cfg = load_profile("cpu/finetune_tiny", overrides=overrides)
    with pytest.raises(ConfigError, match="the model was trained with the byte one"):
        Finetuner.from_config(cfg)


def test_the_finetune_command_needs_a_model(
    tmp_path: Path, examples: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["finetune", "--profile", "cpu/finetune_tiny", "--data", str(examples)])
    assert code == 2
    assert "which model? Give --model NAME|DIR" in capsys.readouterr().err


def test_the_finetune_profile_loads_and_fine_tunes_by_default() -> None:
    cfg = load_profile("finetune")
    assert cfg.training.task.kind == "sft"
    assert cfg.data.source.kind == "sft"
    assert cfg.finetune.base_model is None  # python -m apt finetune --model sets it
