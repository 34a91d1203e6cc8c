"""Resume-critical keys are declared in the schema: every field is classified, and the set of
critical keys is the one the checkpoint docs promise."""

from __future__ import annotations

import pytest

from apt.core.config import APTConfig
from apt.core.config.resume import field_classes, is_resume_critical


def test_every_field_of_the_schema_is_classified() -> None:
    unclassified = [key for key, verdict in field_classes(APTConfig) if verdict is None]
    assert unclassified == [], (
        f"classify these fields (CRITICAL/FREE or a section default): {unclassified}"
    )


def test_the_critical_keys() -> None:
    critical = {key for key, verdict in field_classes(APTConfig) if verdict == "critical"}
    assert {k for k in critical if not k.startswith("model.")} == {
        "data.source.kind",  # a mapping source ({kind: shards, path}); a name: data.source
        "data.source.path",
        # source {kind: sft}: which examples, how they are rendered, cut and packed
        "data.source.val_path",
        "data.source.val_fraction",
        "data.source.format",
        "data.source.template",
        "data.source.packing",
        "data.source.padding_free",
        "data.source.overlong",
        "data.train_files",
        "data.val_files",
        "data.text_field",
        "data.val_fraction",
        "data.max_corpus_bytes",
        "data.tokenizer.kind",
        "data.seq_len",
        "data.shuffle",
        "data.document_mask",
        "training.task.kind",
        "training.batch_size",
        "training.gradient_accumulation_steps",
        "training.seed",
        "training.optimizer.kind",
        "schedules.root",
        # another start or another set of trained tensors (lora.merge only shapes the export)
        "finetune.base_model",
        "finetune.freeze",
        "finetune.lora.rank",
        "finetune.lora.alpha",
        "finetune.lora.rslora",
        "finetune.lora.dropout",
        "finetune.lora.targets",
        "finetune.lora.trainable",
        "finetune.align.loss_weight",
    }
    model_fields = {key for key, _ in field_classes(APTConfig) if key.startswith("model.")}
    # Another network is another run; the kernel of document attention computes the same one.
    kernels = {"model.document_attention"}
    assert model_fields - kernels and model_fields - kernels <= critical
    assert not kernels & critical


@pytest.mark.parametrize(
    ("key", "critical"),
    [
        ("model.moe", True),  # a section switched on or off
        ("data.source", True),  # a source by name (python_stdlib, files)
        ("training.optimizer.kind", True),
        ("training.optimizer.momentum", False),  # a key of one union member only
        ("training.task.beta", True),  # a task's own option
        ("data.tokenizer.vocab_file", True),
        ("schedules.route_temp.start", True),
        ("training.learning_rate", False),
        ("finetune.lora", True),  # adapters switched on or off
        ("finetune.lora.merge", False),
        ("training.checkpoints.directory", False),
        ("data.num_workers", False),
        ("callbacks", False),
        ("artifacts.removed_long_ago", False),  # a key the schema no longer has
    ],
)
def test_keys_beyond_the_leaves_take_their_holders_class(key: str, critical: bool) -> None:
    assert is_resume_critical(APTConfig, key) is critical
