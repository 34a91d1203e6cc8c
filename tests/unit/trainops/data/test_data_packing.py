"""Packing, build_datasets end to end, the token cache, and size errors."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from apt.core.config import DataConfig
from apt.core.errors import DataError
from apt.trainops.data import ByteTokenizer, PackedDataset, build_datasets, tokenize_documents


def _corpus(root: Path, n: int = 8, size: int = 400) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i}.txt").write_text(f"document {i}: " + "x" * size + "\n")
    return str(root / "*.txt")


def test_packing_shapes_and_label_shift() -> None:
    tokens, stats = tokenize_documents(["abc", "de"], ByteTokenizer())
    assert tokens.dtype == np.uint8
    assert tokens.tolist() == [97, 98, 99, 0, 100, 101, 0]  # eos (0) after each document
    assert (stats.documents, stats.bytes, stats.tokens) == (2, 5, 7)
    ds = PackedDataset(tokens, 2)
    assert len(ds) == 3  # windows of 3 tokens overlapping by one: (7 - 1) // 2
    items = [ds[i] for i in range(len(ds))]
    assert [it["input_ids"].tolist() for it in items] == [[97, 98], [99, 0], [100, 101]]
    assert [it["labels"].tolist() for it in items] == [[98, 99], [0, 100], [101, 0]]
    assert all(it["input_ids"].dtype == torch.long for it in items)
    assert ds[-1]["labels"].tolist() == [101, 0]
    with pytest.raises(IndexError):
        ds[3]


def test_build_from_files(tmp_path: Path) -> None:
    cfg = DataConfig(
        source="files", train_files=[_corpus(tmp_path / "c")], seq_len=32, val_fraction=0.25
    )
    bundle = build_datasets(cfg)
    assert bundle.train_stats.files == 6 and bundle.val_stats.files == 2
    assert bundle.train_stats.tokens == 6 * 414  # 413 bytes of text + eos, each file
    assert len(bundle.train) == (6 * 414 - 1) // 32
    assert len(bundle.train_files) == 6 and not set(bundle.train_files) & set(bundle.val_files)
    item = bundle.train[5]
    assert item["input_ids"].shape == (32,) and item["labels"].shape == (32,)
    assert torch.equal(item["input_ids"][1:], item["labels"][:-1])
    assert torch.equal(bundle.train[6]["input_ids"][0:1], item["labels"][-1:])
    assert "train 6 files" in bundle.description and "val 2 files" in bundle.description
    # seq_len override (the engine passes the model's context length)
    assert build_datasets(cfg, seq_len=64).train[0]["input_ids"].shape == (64,)


def test_stdlib_corpus_with_cap_is_deterministic() -> None:
    cfg = DataConfig(max_corpus_bytes=60_000, seq_len=64)
    a, b = build_datasets(cfg), build_datasets(cfg)
    assert a.train_stats.bytes == 60_000  # the cap is exact
    assert 0 < a.val_stats.bytes <= 3_158  # 60_000 * 0.05 / 0.95, rounded up
    assert np.array_equal(a.train.tokens, b.train.tokens)
    assert np.array_equal(a.val.tokens, b.val.tokens)
    assert a.tokenizer.decode(a.train[0]["input_ids"]).startswith('"""')  # __future__.py


def test_explicit_val_files(tmp_path: Path) -> None:
    train = _corpus(tmp_path / "train", n=2)
    val = _corpus(tmp_path / "val", n=1)
    bundle = build_datasets(
        DataConfig(source="files", train_files=[train], val_files=[val], seq_len=16)
    )
    assert (bundle.train_stats.files, bundle.val_stats.files) == (2, 1)
    with pytest.raises(DataError, match=r"doc0\.txt is in both data\.train_files and data\.val"):
        build_datasets(DataConfig(source="files", train_files=[train], val_files=[train]))


def test_too_small_corpus(tmp_path: Path) -> None:
    pattern = _corpus(tmp_path / "c", n=4, size=10)
    cfg = DataConfig(source="files", train_files=[pattern], seq_len=128)
    with pytest.raises(
        DataError,
        match=r"training text \(3 file\(s\): .*doc.*\) is 72 tokens, "
        r"too few for one sequence of data\.seq_len=128 \(needs 129\).*lower "
        r"data\.seq_len",
    ):
        build_datasets(cfg)
    with pytest.raises(DataError, match=r"validation text .* raise data\.val_fraction"):
        build_datasets(cfg, seq_len=40)


def test_cache_round_trip(tmp_path: Path) -> None:
    pattern = _corpus(tmp_path / "c")
    cache = tmp_path / "cache"
    cfg = DataConfig(source="files", train_files=[pattern], seq_len=32, cache_dir=str(cache))
    first = build_datasets(cfg)
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 4 and not [e for e in entries if e.startswith(".tmp")]
    assert "(cached)" not in first.description

    second = build_datasets(cfg)
    assert "(cached)" in second.description
    assert isinstance(second.train.tokens, np.memmap)
    assert np.array_equal(first.train.tokens, second.train.tokens)
    assert np.array_equal(first.val.tokens, second.val.tokens)
    assert second.train_stats == first.train_stats
    assert torch.equal(second.train[3]["labels"], first.train[3]["labels"])
    # Uncached build gives the same tokens.
    plain = build_datasets(cfg.model_copy(update={"cache_dir": None}))
    assert np.array_equal(plain.train.tokens, second.train.tokens)

    # Pickling (spawned DataLoader workers) re-opens the file instead of copying the array.
    blob = pickle.dumps(second.train)
    assert len(blob) < 2_000
    clone = pickle.loads(blob)
    assert torch.equal(clone[7]["input_ids"], second.train[7]["input_ids"])

    # A changed training file (new mtime) is a new training key; validation stays cached.
    doc = first.train_files[0]
    os.utime(doc, ns=(doc.stat().st_atime_ns, doc.stat().st_mtime_ns + 10**9))
    changed = build_datasets(cfg).description
    assert "(cached)" in changed.split("; val")[1] and "(cached)" not in changed.split("; val")[0]
    assert len(list(cache.glob("train-*.npy"))) == 2
    # An entry without its JSON (an interrupted write) is rebuilt.
    for meta in cache.glob("*.json"):
        meta.unlink()
    rebuilt = build_datasets(cfg)
    assert "(cached)" not in rebuilt.description
    assert np.array_equal(rebuilt.val.tokens, first.val.tokens)


def test_cache_dir_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = DataConfig(
        source="files",
        train_files=[_corpus(tmp_path / "c")],
        seq_len=32,
        cache_dir=str(blocker / "cache"),
    )
    with pytest.raises(
        DataError,
        match=r"cannot write the token cache in .*a_file/cache.*"
        r"data\.cache_dir",
    ):
        build_datasets(cfg)
