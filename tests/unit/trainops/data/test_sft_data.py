"""Fine-tuning data: records -> templates -> completion-only labels -> packed or one-a-row
datasets, and the errors a bad file gets (file and line named)."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from apt.core.config import DataConfig, config_from_dict
from apt.core.errors import ConfigError, DataError
from apt.model.tokenizers import SPECIAL_TOKENS
from apt.trainops.data import build_datasets
from apt.trainops.data.bpe import train_bpe
from apt.trainops.data.sft import (
    BuiltinTemplate,
    EncodedExamples,
    Example,
    Message,
    PackedSFTDataset,
    PlainTemplate,
    SFTDataset,
    build_sft_datasets,
    build_template,
    encode_example,
    encode_prompt,
    pack_rows,
    read_examples,
    split_examples,
)
from apt.trainops.data.tokenizers import ByteTokenizer, Tokenizer, build_tokenizer

BYTE = ByteTokenizer()
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao"},
]


def _jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records),
        encoding="utf-8",
    )
    return path


def _example(messages: list[dict[str, str]]) -> Example:
    return Example(tuple(Message(m["role"], m["content"]) for m in messages), "x:1", "messages")


def _trained_text(tokenizer: Tokenizer, ids: np.ndarray, trained: np.ndarray) -> str:
    return tokenizer.decode(ids[trained].tolist())


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("bpe")
    text = "Hello there. How are you? Fine, thanks. Goodbye and ciao.\n" * 40
    (folder / "corpus.txt").write_text(text, encoding="utf-8")
    train_bpe([str(folder / "corpus.txt")], vocab_size=300, output=folder)
    return build_tokenizer({"kind": "bpe", "path": str(folder)})


# --- templates and labels ---------------------------------------------------------------------


def test_builtin_template_with_the_byte_tokenizer_writes_markers_as_text() -> None:
    example = _example([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    template = build_template("builtin", BYTE)
    assert isinstance(template, BuiltinTemplate) and not template.special_tokens
    ids, trained = encode_example(example, template, BYTE)
    prompt = b"<|user|>\n2+2?<|end|>\n<|assistant|>\n"
    answer = b"4<|end|>"
    expected = [*prompt, *answer, *b"\n", BYTE.eos_id]
    assert ids.tolist() == expected
    # Token by token: the answer and its end marker, then the closing end-of-text.
    mask = [False] * len(prompt) + [True] * len(answer) + [False, True]
    assert trained.tolist() == mask


def test_builtin_template_masks_system_and_user_turns_token_by_token() -> None:
    ids, trained = encode_example(_example(CHAT), build_template("builtin", BYTE), BYTE)
    text = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in CHAT).encode() + bytes([0])
    assert ids.tolist() == list(text)
    expected = np.zeros(len(text), dtype=bool)
    for answer in (b"Hello<|end|>", b"Ciao<|end|>"):
        at = text.index(b"\n" + answer) + 1
        expected[at : at + len(answer)] = True
    expected[-1] = True  # end-of-text after the last answer
    assert np.array_equal(trained, expected)
    assert _trained_text(BYTE, ids, trained) == "Hello<|end|>Ciao<|end|>\x00"


def test_builtin_template_uses_the_special_tokens_of_a_bpe_tokenizer(bpe: Tokenizer) -> None:
    template = build_template("builtin", bpe)
    assert isinstance(template, BuiltinTemplate) and template.special_tokens
    ids, trained = encode_example(_example(CHAT), template, bpe)
    special = {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    # One id per marker, none of them in a user or system turn's labels.
    for marker in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert special[marker] in ids.tolist()
    assert ids.tolist().count(special["<|end|>"]) == len(CHAT)
    assert not trained[np.isin(ids, [special["<|system|>"], special["<|user|>"]])].any()
    assert not trained[ids == special["<|assistant|>"]].any()
    assert _trained_text(bpe, ids, trained) == "Hello<|end|>Ciao<|end|><|endoftext|>"
    assert ids[-1] == bpe.eos_id and trained[-1]


@pytest.mark.parametrize("tokenizer_name", ["byte", "bpe"])
def test_the_generation_prompt_is_what_precedes_each_answer(
    tokenizer_name: str, bpe: Tokenizer
) -> None:
    tokenizer = BYTE if tokenizer_name == "byte" else bpe
    template = build_template("builtin", tokenizer)
    ids, trained = encode_example(_example(CHAT[:3]), template, tokenizer)
    prompt = encode_prompt(_example(CHAT[:2]).messages, template, tokenizer)
    assert ids[: len(prompt)].tolist() == prompt.tolist()
    assert not trained[: len(prompt)].any() and trained[len(prompt)]


def test_plain_template_is_one_document_between_end_of_text_tokens() -> None:
    example = _example(
        [{"role": "user", "content": "def f("}, {"role": "assistant", "content": "x):"}]
    )
    template = build_template("plain", BYTE)
    assert isinstance(template, PlainTemplate)
    ids, trained = encode_example(example, template, BYTE)
    assert ids.tolist() == [0, *b"def f(x):", 0]
    assert trained.tolist() == [False] * 7 + [True] * 3 + [True]


def _hf_folder(bpe: Tokenizer, tmp_path: Path, config: dict[str, Any]) -> Tokenizer:
    source = bpe.path  # type: ignore[attr-defined]
    (tmp_path / "tokenizer.json").write_bytes(source.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return build_tokenizer({"kind": "hf", "path": str(tmp_path)})


CHATML = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_the_tokenizer_template_trains_what_each_assistant_turn_adds(
    bpe: Tokenizer, tmp_path: Path
) -> None:
    tokenizer = _hf_folder(bpe, tmp_path, {"chat_template": CHATML, "bos_token": "<|pad|>"})
    template = build_template("tokenizer", tokenizer)
    ids, trained = encode_example(_example(CHAT), template, tokenizer)
    rendered = "<|pad|>" + "".join(f"<|{m['role']}|>{m['content']}<|end|>\n" for m in CHAT)
    assert tokenizer.decode(ids.tolist()) == rendered
    # After each "<|assistant|>" (the generation prompt): the answer, its end, the newline.
    assert _trained_text(tokenizer, ids, trained) == "Hello<|end|>\nCiao<|end|>\n"
    prompt = encode_prompt(_example(CHAT[:2]).messages, template, tokenizer)
    assert (
        tokenizer.decode(prompt.tolist())
        == "<|pad|><|system|>Be brief.<|end|>\n<|user|>Hi<|end|>\n<|assistant|>"
    )


def test_the_tokenizer_template_needs_one(bpe: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"the byte tokenizer has none.*template: builtin"):
        build_template("tokenizer", BYTE)
    without = _hf_folder(bpe, tmp_path, {"bos_token": "<s>"})
    with pytest.raises(ConfigError, match=r"tokenizer_config.json has no chat_template"):
        build_template("tokenizer", without)


def test_the_tokenizer_template_without_jinja2_gives_the_pip_line(
    bpe: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = _hf_folder(bpe, tmp_path, {"chat_template": CHATML})
    monkeypatch.setitem(sys.modules, "jinja2", None)  # import jinja2 -> ImportError
    monkeypatch.setitem(sys.modules, "jinja2.sandbox", None)
    with pytest.raises(ConfigError, match=r"jinja2 is not installed. To fix: pip install jinja2"):
        build_template("tokenizer", tokenizer)


def test_a_template_that_rewrites_earlier_turns_is_refused(bpe: Tokenizer, tmp_path: Path) -> None:
    rewrites = "{% for m in messages %}{{ m['content'] }}{{ messages | length }}{% endfor %}"
    tokenizer = _hf_folder(bpe, tmp_path, {"chat_template": rewrites})
    with pytest.raises(DataError, match=r"x:1: .*does not render this conversation turn by turn"):
        encode_example(_example(CHAT), build_template("tokenizer", tokenizer), tokenizer)


# --- reading records --------------------------------------------------------------------------


def test_records_of_both_layouts_are_read_in_file_order(tmp_path: Path) -> None:
    file = _jsonl(
        tmp_path / "a.jsonl",
        [{"prompt": "p", "completion": "c", "id": 7}, "", {"messages": CHAT}],
    )
    first, second = read_examples(file, key="data.source.path")
    assert first.messages == (Message("user", "p"), Message("assistant", "c"))
    assert first.where == f"{file}:1" and first.layout == "prompt_completion"
    assert second.where == f"{file}:3" and len(second.messages) == 5


@pytest.mark.parametrize(
    ("line", "fmt", "message"),
    [
        ("{not json", "auto", r":2: not JSON .* Each line must be one JSON object"),
        ('["a list"]', "auto", r":2: a JSON list, not an object"),
        ('{"prompt": "p"}', "prompt_completion", r":2: no 'completion' key .*\"completion\""),
        ('{"text": "t"}', "auto", r":2: neither 'messages' nor 'prompt'/'completion'"),
        ('{"prompt": "p", "completion": "  "}', "auto", r":2: the completion is empty.*Fill"),
        ('{"prompt": 3, "completion": "c"}', "auto", r":2: 'prompt' is a int, not a string"),
        (
            '{"messages": [{"role": "bot", "content": "x"}]}',
            "auto",
            r":2: messages\[0\]: unknown role 'bot'; valid roles: system, user, assistant",
        ),
        (
            '{"messages": [{"role": "user", "content": "x"}]}',
            "auto",
            r":2: the conversation has no assistant turn.*Add the assistant's answer",
        ),
        (
            '{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}',
            "auto",
            r":2: messages\[0\] has no content",
        ),
        ('{"messages": "hi"}', "auto", r":2: 'messages' a str; a messages record"),
    ],
)
def test_a_bad_record_names_its_file_line_and_fix(
    tmp_path: Path, line: str, fmt: Any, message: str
) -> None:
    file = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c"}, line])
    with pytest.raises(DataError, match=message) as err:
        read_examples(file, fmt=fmt, key="data.source.path")
    assert str(err.value).startswith(f"{file}:2: ")


def test_a_missing_or_empty_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.source.path: .*nothing.jsonl not found"):
        read_examples(tmp_path / "nothing.jsonl", key="data.source.path")
    with pytest.raises(DataError, match=r"holds no example"):
        read_examples(_jsonl(tmp_path / "empty.jsonl", ["", " "]), key="data.source.path")


# --- packing and datasets ---------------------------------------------------------------------


def test_pack_rows_places_longest_first_into_the_tightest_row() -> None:
    lengths = [5, 3, 8, 2, 2, 6, 4]
    rows = pack_rows(lengths, 10)
    assert rows == [[2, 4], [5, 6], [0, 1, 3]]  # 8+2, 6+4, 5+3+2 (a tie: the newer row)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert pack_rows(lengths, 10) == rows  # the same every time
    with pytest.raises(ValueError, match=r"outside 1..10"):
        pack_rows([11], 10)


def _encoded(n: int, seed: int = 0) -> EncodedExamples:
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        size = int(rng.integers(3, 12))
        ids = rng.integers(1, 200, size)
        trained = np.arange(size) >= size // 2  # the second half is the completion
        pairs.append((ids, trained))
    return EncodedExamples.join(pairs)


def test_a_packed_row_holds_each_example_shifted_on_its_own() -> None:
    examples = _encoded(9)
    packed = PackedSFTDataset(examples, 16, pad_id=0)
    seen = []
    for r in range(len(packed)):
        row = packed[r]
        assert {k: v.shape for k, v in row.items()} == {k: (16,) for k in row}
        members = packed.row_examples[packed.row_offsets[r] : packed.row_offsets[r + 1]]
        at = 0
        for document, index in enumerate(members.tolist()):
            ids, labels = examples.example(index)
            span = slice(at, at + len(ids))
            assert torch.equal(row["input_ids"][span], ids)
            assert torch.equal(row["labels"][span], labels)
            assert (row["document_ids"][span] == document).all()
            at += len(ids)
            seen.append(index)
        assert (row["labels"][at:] == -100).all() and (row["input_ids"][at:] == 0).all()
        assert (row["document_ids"][at:] == len(members)).all()  # padding: its own document
        assert (row["document_ids"].diff() >= 0).all()
    assert sorted(seen) == list(range(9))
    total = sum(int((packed[r]["labels"] != -100).sum()) for r in range(len(packed)))
    assert total == packed.num_targets == examples.num_targets


def test_labels_are_the_next_trained_tokens() -> None:
    examples = EncodedExamples.join([(np.array([7, 8, 9, 10]), np.array([0, 0, 1, 1], bool))])
    ids, labels = examples.example(0)
    assert ids.tolist() == [7, 8, 9] and labels.tolist() == [-100, 9, 10]
    assert examples.num_targets == 2
    assert SFTDataset(examples, 3)[0]["labels"].tolist() == [-100, 9, 10]


def test_datasets_pickle_and_build_the_same_rows(tmp_path: Path) -> None:
    records = [{"prompt": f"q{i}", "completion": f" a{i % 7}"} for i in range(30)]
    cfg = DataConfig(source={"kind": "sft", "path": str(_jsonl(tmp_path / "t.jsonl", records))})
    one, two = build_sft_datasets(cfg, seed=3), build_sft_datasets(cfg, seed=3)
    assert len(one.train) == len(two.train) and len(one.train) < 28  # several examples a row
    for data in (one.train, pickle.loads(pickle.dumps(one.train))):
        for r in range(len(data)):
            for key, value in data[r].items():
                assert torch.equal(value, two.train[r][key])


def test_the_held_out_share_is_seeded(tmp_path: Path) -> None:
    examples = read_examples(
        _jsonl(tmp_path / "t.jsonl", [{"prompt": str(i), "completion": "c"} for i in range(40)]),
        key="k",
    )
    train, val = split_examples(examples, 0.1, seed=1, key="k")
    assert (len(train), len(val)) == (36, 4)
    assert split_examples(examples, 0.1, seed=1, key="k") == (train, val)
    assert split_examples(examples, 0.1, seed=2, key="k")[1] != val
    assert [e.where for e in train] == sorted(
        (e.where for e in train), key=lambda w: int(w.split(":")[-1])
    )
    assert {e.where for e in train} | {e.where for e in val} == {e.where for e in examples}
    with pytest.raises(DataError, match=r"1 example cannot be split.*val_path"):
        split_examples(examples[:1], 0.1, seed=1, key="k")


def _long_and_short(tmp_path: Path, long_prompt: int) -> Path:
    return _jsonl(
        tmp_path / "t.jsonl",
        [
            {"prompt": "p" * long_prompt, "completion": "abcdefgh"},
            {"prompt": "q", "completion": "c"},
            {"prompt": "r", "completion": "d"},
        ],
    )


def test_overlong_examples_are_truncated_dropped_or_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    val = _jsonl(tmp_path / "v.jsonl", [{"prompt": "v", "completion": "w"}])
    builtin_prompt = len("<|user|>\n<|end|>\n<|assistant|>\n")  # 31 bytes around the prompt

    def build(overlong: str, long_prompt: int) -> Any:
        source = {"kind": "sft", "path": str(_long_and_short(tmp_path, long_prompt))}
        source |= {"val_path": str(val), "overlong": overlong, "packing": False}
        return build_sft_datasets(DataConfig(source=source, seq_len=48), seed=0)

    # Cut inside the completion: kept, 48 positions; cut before it: dropped.
    bundle = build("truncate", 48 - builtin_prompt - 3)
    assert bundle.train_stats.truncated == 1 and bundle.train_stats.dropped == 0
    assert len(bundle.train) == 3 and len(bundle.train[0]["input_ids"]) == 48
    assert "1 of 3 train examples are longer than data.seq_len=48: 1 truncated" in caplog.text
    bundle = build("truncate", 60)
    assert (bundle.train_stats.truncated, bundle.train_stats.dropped, len(bundle.train)) == (
        1,
        1,
        2,
    )
    bundle = build("drop", 20)
    assert (bundle.train_stats.dropped, len(bundle.train)) == (1, 2)
    with pytest.raises(DataError, match=r"t.jsonl:1: the example is \d+ tokens, more than data"):
        build("error", 20)


# --- config and sources -----------------------------------------------------------------------


def test_the_sft_source_refuses_the_keys_of_text_sources() -> None:
    source = {"kind": "sft", "path": "t.jsonl"}
    with pytest.raises(
        ConfigError, match=r"data.val_fraction does not apply to source \{kind: sft\}"
    ):
        config_from_dict({"data": {"source": source, "val_fraction": 0.2}})
    with pytest.raises(ConfigError, match=r"document_mask does not apply to source \{kind: sft\}"):
        config_from_dict({"data": {"source": source, "document_mask": True}})
    with pytest.raises(ConfigError, match=r"source 'sft' needs the examples file"):
        config_from_dict({"data": {"source": {"kind": "sft"}}})
    with pytest.raises(ConfigError, match=r"val_path .* or val_fraction .* not both"):
        config_from_dict({"data": {"source": source | {"val_path": "v", "val_fraction": 0.1}}})
    with pytest.raises(ConfigError, match=r"data.source.template: .*'builtin', 'tokenizer'"):
        config_from_dict({"data": {"source": source | {"template": "chatml"}}})


def test_causal_lm_data_refuses_an_sft_source(tmp_path: Path) -> None:
    cfg = DataConfig(source={"kind": "sft", "path": "t.jsonl"})
    with pytest.raises(ConfigError, match=r"set training.task: sft"):
        build_datasets(cfg)
    with pytest.raises(DataError, match=r"val_path: .* is data.source.path too"):
        file = str(_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "completion": "c"}]))
        build_sft_datasets(
            DataConfig(source={"kind": "sft", "path": file, "val_path": file}), seed=0
        )
