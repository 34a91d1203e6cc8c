"""``data.document_mask``: shard windows carry the document of each token, the model keeps
attention inside documents, and a run trains with it on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from shard_folder import ShardFolder, stdlib_texts, write_shard_folder

from apt.core.config import load_profile
from apt.core.errors import ConfigError
from apt.trainops.data import ShardDataset
from apt.trainops.engine import Trainer

SEQ = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> ShardFolder:
    text = "".join(stdlib_texts(4300))
    documents = [text[i : i + 300] for i in range(0, len(text), 300)]  # 15 documents
    texts = {"train": documents, "val": stdlib_texts(700, skip_bytes=4300)}
    return write_shard_folder(tmp_path_factory.mktemp("data") / "shards", texts, shard_tokens=1000)


def test_windows_carry_the_document_of_each_token(shards: ShardFolder) -> None:
    dataset = ShardDataset(shards.path, "train", SEQ, document_ids=True)
    starts = shards.offsets["train"]
    assert len(starts) > 2  # several documents, so some windows hold two
    crossing = 0
    for i in range(len(dataset)):
        item = dataset[i]
        positions = np.arange(i * SEQ, i * SEQ + SEQ)
        expected = np.searchsorted(starts, positions, side="right") - 1
        assert torch.equal(item["document_ids"], torch.from_numpy(expected))
        crossing += int(item["document_ids"].unique().numel() > 1)
    assert crossing > 0
    batch = dataset.__getitems__([0, 3, len(dataset) - 1])
    for row, index in zip(batch, [0, 3, len(dataset) - 1], strict=True):
        assert torch.equal(row["document_ids"], dataset[index]["document_ids"])
        assert torch.equal(row["input_ids"], dataset[index]["input_ids"])


def test_a_run_trains_with_the_document_mask(shards: ShardFolder, tmp_path: Path) -> None:
    cfg = load_profile(
        "cpu/pretrain_tiny",
        overrides=[
            f"data.source.path={shards.path}",
            "data.document_mask=true",
            f"artifacts.output_dir={tmp_path}",
        ],
    )
    trainer = Trainer.from_config(cfg)
    assert trainer.train_loader.dataset[0]["document_ids"].shape == (SEQ,)
    m = trainer.train().metrics
    assert m["val_loss_final"] < m["val_loss_initial"] - 1.0, m


def test_document_mask_needs_a_shard_source() -> None:
    with pytest.raises(ConfigError, match="document_mask needs source"):
        load_profile("cpu/tiny", overrides=["data.document_mask=true"])
