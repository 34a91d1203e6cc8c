"""``data.source: {kind: shards}``: ShardDataset windows, build_datasets over a shard folder, the
tokenizer of the index, and every refusal with its message.

The folders are written by ``tests/helpers/shard_folder.py`` in the documented format, from
standard-library text tokenized with the byte tokenizer (or a small trained BPE).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from shard_folder import ShardFolder, stdlib_texts, write_shard_folder
from torch.utils.data import DataLoader

from apt.core.config import DataConfig, load_profile
from apt.core.errors import ConfigError, DataError
from apt.trainops.data import PackedDataset, ShardDataset, build_datasets, data_tokenizer
from apt.trainops.data.bpe import train_bpe
from apt.trainops.data.cache import cache_key
from apt.trainops.data.corpus import CorpusFile
from apt.trainops.data.shards.index import INDEX_FILE, read_index, write_index
from apt.trainops.engine import PreTrainer

SEQ = 16


@pytest.fixture(scope="module")
def texts() -> dict[str, list[str]]:
    return {"train": stdlib_texts(6000), "val": stdlib_texts(1500, skip_bytes=6000)}


def folder_of(tmp_path: Path, texts: dict[str, list[str]], **kwargs: object) -> ShardFolder:
    return write_shard_folder(tmp_path / "shards", texts, **kwargs)  # type: ignore[arg-type]


def source(folder: Path, **data: object) -> DataConfig:
    return DataConfig(source={"kind": "shards", "path": str(folder)}, seq_len=SEQ, **data)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- windows
@pytest.mark.parametrize("shard_tokens", [7, 100, 100_000])  # windows over 3, 2 and 1 shards
def test_windows_are_slices_of_the_split_stream(
    tmp_path: Path, texts: dict[str, list[str]], shard_tokens: int
) -> None:
    made = folder_of(tmp_path, texts, shard_tokens=shard_tokens)
    stream = made.streams["train"]
    data = ShardDataset(made.path, "train", SEQ)
    assert len(data) == (len(stream) - 1) // SEQ and data.num_tokens == len(stream)
    spanning = 0
    for i in range(len(data)):
        item = data[i]
        window = stream[i * SEQ : i * SEQ + SEQ + 1]
        assert np.array_equal(item["input_ids"].numpy(), window[:-1]), i
        assert np.array_equal(item["labels"].numpy(), window[1:]), i
        spanning += (i * SEQ) // shard_tokens != (i * SEQ + SEQ) // shard_tokens
    if shard_tokens < len(stream):
        assert spanning > 0, "no window crossed a shard boundary"
    assert torch.equal(data[-1]["labels"], data[len(data) - 1]["labels"])
    with pytest.raises(IndexError, match="out of range"):
        data[len(data)]


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_get_batch_stacks_windows_of_the_stream(
    tmp_path: Path, texts: dict[str, list[str]], dtype: str
) -> None:
    made = folder_of(tmp_path, texts, shard_tokens=7, dtype=dtype)  # windows over 3 shards
    stream = made.streams["train"]
    data = ShardDataset(made.path, "train", SEQ)
    rows = [len(data) - 1, 0, 5, 5, 3]
    want = np.stack([stream[i * SEQ : i * SEQ + SEQ + 1] for i in rows])  # (5, SEQ + 1)
    batch = data.get_batch(rows)
    assert sorted(batch) == ["input_ids", "labels"]
    for key, cut in (("input_ids", want[:, :-1]), ("labels", want[:, 1:])):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (5, SEQ)
        assert np.array_equal(batch[key].numpy(), cut), key
    items = data.__getitems__(rows)  # torch's contract: a list of items
    assert isinstance(items, list) and len(items) == 5
    for item, i in zip(items, rows, strict=True):
        assert torch.equal(item["labels"], data[i]["labels"])
    stacked = data.stacked_batches()
    assert isinstance(stacked, ShardDataset) and not isinstance(data.__getitems__(rows), dict)
    assert torch.equal(stacked.__getitems__(rows)["input_ids"], batch["input_ids"])
    for bad in ([0, len(data)], [-1]):
        with pytest.raises(IndexError, match="out of range"):
            data.get_batch(bad)
    assert data.get_batch([])["input_ids"].shape == (0, SEQ)


def test_items_match_packed_dataset_of_the_same_stream(
    tmp_path: Path, texts: dict[str, list[str]]
) -> None:
    """Same keys, dtypes, shapes and values as PackedDataset: the causal_lm task sees no
    difference between a text source and a shard folder."""
    made = folder_of(tmp_path, texts, shard_tokens=300)
    shards = ShardDataset(made.path, "val", SEQ)
    packed = PackedDataset(made.streams["val"].astype(np.uint8), SEQ)
    assert len(shards) == len(packed)
    for i in (0, 1, len(packed) // 2, len(packed) - 1):
        got, want = shards[i], packed[i]
        assert sorted(got) == sorted(want) == ["input_ids", "labels"]
        for key in want:
            assert got[key].dtype == want[key].dtype == torch.int64
            assert got[key].shape == want[key].shape == (SEQ,)
            assert torch.equal(got[key], want[key])


def test_a_tail_shorter_than_a_window_is_dropped(tmp_path: Path) -> None:
    made = write_shard_folder(tmp_path / "s", {"train": ["a" * 39], "val": ["b" * 20]})
    data = ShardDataset(made.path, "train", 8)  # 40 tokens (eos included) -> 4 windows
    assert len(data) == 4
    assert data[3]["labels"][-1].item() == ord("a")  # token 32; tokens 33..39 fill no window


def test_pickled_dataset_holds_no_open_map_and_workers_read_it(
    tmp_path: Path, texts: dict[str, list[str]]
) -> None:
    made = folder_of(tmp_path, texts, shard_tokens=500)
    data = ShardDataset(made.path, "train", SEQ)
    first = [data[i]["input_ids"] for i in range(len(data))]  # maps every shard
    assert len(data._open) == len(data.files)
    blob = pickle.dumps(data)
    assert len(blob) < 4000, "the pickled dataset carries token data"
    copy = pickle.loads(blob)
    assert len(copy._open) == 0
    assert all(torch.equal(a, copy[i]["input_ids"]) for i, a in enumerate(first))
    # A spawned worker receives the pickled dataset and maps the shards itself.
    loader = DataLoader(data, batch_size=8, num_workers=1, multiprocessing_context="spawn")
    in_process = DataLoader(data, batch_size=8)
    for a, b in zip(loader, in_process, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_at_most_64_shards_stay_mapped(tmp_path: Path) -> None:
    made = write_shard_folder(
        tmp_path / "s", {"train": ["x" * 999], "val": ["y" * 50]}, shard_tokens=10
    )
    data = ShardDataset(made.path, "train", 4)
    for i in range(len(data)):
        data[i]
    assert len(data.files) == 100 and len(data._open) == 64
    assert torch.equal(data[0]["input_ids"], torch.full((4,), ord("x")))  # re-mapped


# ------------------------------------------------------------------------ build_datasets
def test_build_datasets_reads_both_splits_with_the_index_tokenizer(
    tmp_path: Path, texts: dict[str, list[str]]
) -> None:
    made = folder_of(tmp_path, texts, shard_tokens=1000)
    bundle = build_datasets(source(made.path))
    assert isinstance(bundle.train, ShardDataset) and isinstance(bundle.val, ShardDataset)
    assert (bundle.train.split, bundle.val.split) == ("train", "val")
    tokens = len(made.streams["train"])
    assert len(bundle.train) == (tokens - 1) // SEQ
    assert bundle.tokenizer.name == "byte"
    assert bundle.train_stats.tokens == tokens
    assert bundle.train_stats.documents == len(texts["train"])
    assert bundle.train_stats.files == len(bundle.train_files) == -(-tokens // 1000)
    assert bundle.train_files[0] == made.path / "train-00000.bin"
    d = bundle.description
    assert str(made.path) in d and "tokenizer byte (256)" in d and f"seq_len {SEQ}" in d
    assert f"{tokens:,} tokens -> {len(bundle.train):,} seqs" in d
    # The engine's shorter context wins over data.seq_len.
    assert build_datasets(source(made.path), seq_len=8).train.seq_len == 8


def test_config_takes_a_shard_mapping_and_keeps_the_names() -> None:
    cfg = load_profile(
        "cpu/tiny",
        overrides=["data.source={kind: shards, path: /x/y}", "data.max_corpus_bytes=null"],
    )
    assert cfg.data.source.path == "/x/y"  # type: ignore[union-attr]
    assert load_profile("cpu/tiny").data.source == "python_stdlib"
    assert (
        load_profile("cpu/pretrain_tiny", overrides=["data.source.path=z"]).data.source.path == "z"
    )  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"source": "shards"}, r"needs the prepared folder: source: \{kind: shards, path: DIR\}"),
        ({"source": {"kind": "shards"}}, "needs the prepared folder"),
        ({"source": "shard"}, r"unknown source 'shard'; valid: python_stdlib, files.* \{kind"),
        ({"source": {"kind": "shardz", "path": "x"}}, "must have kind: shards"),
        (
            {"source": {"kind": "shards", "path": "x"}, "max_corpus_bytes": 5, "cache_dir": "c"},
            r"data.max_corpus_bytes, data.cache_dir do not apply to source \{kind: shards\}",
        ),
        ({"source": {"kind": "shards", "path": "x"}, "train_files": ["a"]}, "train_files does"),
    ],
)
def test_bad_shard_configs_say_what_to_write(data: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DataConfig(**data)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- errors
def test_a_missing_folder_or_index_is_an_unfinished_preparation(
    tmp_path: Path, texts: dict[str, list[str]]
) -> None:
    with pytest.raises(DataError, match=r"data.source.path: .*nowhere is not a folder of prepared"):
        build_datasets(source(tmp_path / "nowhere"))
    made = folder_of(tmp_path, texts)
    (made.path / INDEX_FILE).unlink()
    with pytest.raises(DataError, match=r"has no index.json: its preparation did not finish"):
        build_datasets(source(made.path))


def test_a_missing_shard_is_named(tmp_path: Path, texts: dict[str, list[str]]) -> None:
    made = folder_of(tmp_path, texts, shard_tokens=1000)
    (made.path / "train-00002.bin").unlink()
    with pytest.raises(
        DataError,
        match=r"train-00002.bin is missing: .*index.json lists it as "
        r"train shard 3 of \d+. Copy the whole folder again",
    ):
        build_datasets(source(made.path))


def test_a_shard_of_the_wrong_size_is_named(tmp_path: Path, texts: dict[str, list[str]]) -> None:
    made = folder_of(tmp_path, texts, shard_tokens=1000)
    path = made.path / "val-00000.bin"
    path.write_bytes(path.read_bytes()[:-6])
    with pytest.raises(
        DataError,
        match=r"val-00000.bin is 1,994 bytes, but .*index.json gives it "
        r"1,000 uint16 tokens \(2,000 bytes\): the file is truncated",
    ):
        build_datasets(source(made.path))


def test_no_val_split_is_an_error_that_says_how_to_get_one(
    tmp_path: Path, texts: dict[str, list[str]]
) -> None:
    made = write_shard_folder(tmp_path / "s", {"train": texts["train"]})
    with pytest.raises(
        DataError,
        match=r"has no 'val' split \(it has: train\). Training validates "
        r"on it: prepare the folder again with a validation share above 0",
    ):
        build_datasets(source(made.path))
    small = write_shard_folder(tmp_path / "t", {"train": texts["train"], "val": ["tiny"]})
    with pytest.raises(
        DataError,
        match=r"the 'val' split holds 5 tokens, too few for one sequence "
        r"of data.seq_len=16 \(needs 17\)",
    ):
        build_datasets(source(small.path))


def test_an_index_that_contradicts_its_shards_is_refused(
    tmp_path: Path, texts: dict[str, list[str]]
) -> None:
    made = folder_of(tmp_path, texts)
    raw = json.loads((made.path / INDEX_FILE).read_text())
    raw["splits"]["train"]["tokens"] += 1
    (made.path / INDEX_FILE).write_text(json.dumps(raw))
    with pytest.raises(DataError, match="the index contradicts itself"):
        build_datasets(source(made.path))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(stdlib_texts(60_000)):
        (corpus / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    return train_bpe([str(corpus / "*.txt")], vocab_size=512, output=tmp_path_factory.mktemp("bpe"))


def test_another_tokenizer_than_the_index_names_both_and_the_fix(
    tmp_path: Path, texts: dict[str, list[str]], bpe: Path
) -> None:
    made = folder_of(tmp_path, texts)
    with pytest.raises(
        ConfigError,
        match=r"data.tokenizer: \{kind: bpe, path: .*tokenizer.json\} "
        r"\(fingerprint \w{12}\) is not the tokenizer the shards in .* were made "
        r"with: byte \(fingerprint \w{12}, .*index.json\). To fix: remove "
        r"data.tokenizer from the config",
    ):
        build_datasets(source(made.path, tokenizer={"kind": "bpe", "path": str(bpe)}))


def test_the_index_tokenizer_is_used_and_checked(
    tmp_path: Path, texts: dict[str, list[str]], bpe: Path
) -> None:
    made = folder_of(tmp_path, texts, tokenizer={"kind": "bpe", "path": str(bpe)})
    cfg = source(made.path)  # data.tokenizer left at its default
    bundle = build_datasets(cfg)
    assert bundle.tokenizer.name == "bpe" and bundle.tokenizer.vocab_size == 512
    assert data_tokenizer(cfg).vocab_size == 512
    assert "tokenizer {kind: bpe, path: " in bundle.description
    # Naming the same tokenizer explicitly is fine.
    assert build_datasets(source(made.path, tokenizer={"kind": "bpe", "path": str(bpe)})).train
    # A tokenizer.json that changed since the shards were made: the ids mean other text.
    index = read_index(made.path)
    changed = index.tokenizer.__class__(**{**index.tokenizer.__dict__, "fingerprint": "0" * 64})
    write_index(made.path, index.__class__(**{**index.__dict__, "tokenizer": changed}))
    with pytest.raises(
        DataError,
        match=r"built here it has fingerprint \w{12} \(its vocabulary "
        r"or options changed\)",
    ):
        build_datasets(cfg)


def test_a_model_vocabulary_smaller_than_the_shards_is_refused(
    tmp_path: Path, texts: dict[str, list[str]], bpe: Path
) -> None:
    made = folder_of(tmp_path, texts, tokenizer={"kind": "bpe", "path": str(bpe)})
    cfg = load_profile("cpu/pretrain_tiny", overrides=[f"artifacts.output_dir={tmp_path}"])
    with pytest.raises(
        ConfigError,
        match=r"model.vocab_size: 256 is smaller than the vocabulary "
        r"of data.tokenizer 'bpe' \(512 ids\).*at least 512",
    ):
        PreTrainer(data_path=made.path, config=cfg)
    auto = load_profile(
        "cpu/pretrain_tiny", overrides=["model.vocab_size=auto", f"artifacts.output_dir={tmp_path}"]
    )
    trainer = PreTrainer(data_path=made.path, config=auto, max_steps=1)
    assert trainer.config.model.vocab_size == 512  # sized from the index's tokenizer
    assert trainer.tokenizer is not None and trainer.tokenizer.name == "bpe"  # the index's
    trainer.close()


# -------------------------------------------------------------------------- token cache
class _Named:
    """Two tokenizers of one name whose vocabularies differ (a retrained BPE)."""

    name, vocab_size, eos_id = "bpe", 512, 0

    def __init__(self, text: str) -> None:
        self.text = text

    def serialized(self) -> str:
        return self.text


def test_the_token_cache_keys_on_the_tokenizer_fingerprint(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    files = [CorpusFile(tmp_path / "a.txt", tmp_path / "a.txt", "txt")]  # type: ignore[call-arg]

    def key(tokenizer: object) -> str:
        return cache_key(files, tokenizer=tokenizer, seq_len=8, text_field="text", max_bytes=None)  # type: ignore[arg-type]

    assert key(_Named("merges v1")) != key(_Named("merges v2"))
    assert key(_Named("merges v1")) == key(_Named("merges v1"))
