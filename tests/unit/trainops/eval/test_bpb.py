"""Bits per byte: the byte table of a tokenizer, and bpb = summed nats / ln 2 / target bytes."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pytest
import torch

from apt.core.config import ModelConfig
from apt.core.errors import DataError
from apt.model import APTModel
from apt.trainops.data import ByteTokenizer, PackedDataset, tokenize_documents
from apt.trainops.data.tokenizers import count_token_bytes
from apt.trainops.eval import Evaluator, compute_metrics, token_byte_lengths

TEXT = "Bits per byte compare models whose tokenizers differ. " * 12


class Pairs:
    """A made-up tokenizer: 64 ids, each two ASCII letters of text (``aa``, ``ab``, ...)."""

    name = "pairs"
    vocab_size = 64
    eos_id = 0

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(chr(97 + i // 8) + chr(97 + i % 8) for i in ids)


class Pieces(Pairs):
    """A tokenizer that says what each id's bytes are (as byte-level BPE must)."""

    def token_bytes(self, token_id: int) -> bytes:
        return b"x" * (1 + token_id % 3)

    def decode(self, ids: Iterable[int]) -> str:
        raise AssertionError("token_bytes is used when the tokenizer has it")


@pytest.fixture
def model() -> APTModel:
    torch.manual_seed(0)
    return APTModel(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, max_seq_len=16))


def byte_dataset() -> PackedDataset:
    tokens, _ = tokenize_documents([TEXT], ByteTokenizer())
    return PackedDataset(tokens, 16)


def test_the_byte_table_of_each_kind_of_tokenizer() -> None:
    assert torch.equal(token_byte_lengths(ByteTokenizer()), torch.ones(256, dtype=torch.int64))
    assert torch.equal(token_byte_lengths(Pairs()), torch.full((64,), 2))
    assert token_byte_lengths(Pieces()).tolist() == [1 + i % 3 for i in range(64)]

    class Accents(Pairs):
        def decode(self, ids: Iterable[int]) -> str:
            return "".join("é" if i % 2 else "e" for i in ids)

    assert token_byte_lengths(Accents()).tolist()[:4] == [1, 2, 1, 2]  # UTF-8 bytes, not chars


def test_byte_tokenizer_bpb_is_the_loss_in_bits(model: APTModel) -> None:
    table = token_byte_lengths(ByteTokenizer())
    got = Evaluator(model=model, eval_dataset=byte_dataset(), token_bytes=table).evaluate()
    assert got is not None and list(got)[:3] == ["loss", "perplexity", "bpb"]
    assert got["bpb"] == got["loss"] / math.log(2)  # exactly: one byte per target


def test_two_bytes_a_token_halve_the_bpb(model: APTModel) -> None:
    data = byte_dataset()
    ones = Evaluator(
        model=model, eval_dataset=data, token_bytes=token_byte_lengths(ByteTokenizer())
    )
    twos = Evaluator(model=model, eval_dataset=data, token_bytes=torch.full((256,), 2))
    one, two = ones.evaluate(), twos.evaluate()
    assert one is not None and two is not None
    assert two["loss"] == one["loss"]
    assert two["bpb"] == pytest.approx(one["bpb"] / 2, rel=1e-12)


def test_bytes_are_summed_over_the_scored_targets_only(model: APTModel) -> None:
    table = token_byte_lengths(Pieces())  # 1, 2 or 3 bytes an id
    rows = torch.arange(40).reshape(4, 10) % 64
    labels = rows.clone()
    labels[2:, 5:] = -100
    samples = [{"input_ids": r, "labels": lab} for r, lab in zip(rows, labels, strict=True)]
    got = Evaluator(model=model, eval_dataset=samples, token_bytes=table, metrics=["loss", "bpb"])
    result = got.evaluate()
    kept = labels[labels != -100]
    assert result is not None
    nats = result["loss"] * kept.numel()
    assert result["bpb"] == pytest.approx(nats / math.log(2) / float(table[kept].sum()), rel=1e-12)
    with torch.no_grad():
        logits = model(rows).logits
    ours = compute_metrics(logits, labels, ["loss", "bpb"], token_bytes=table)
    assert ours == pytest.approx(result, rel=1e-6)


def test_an_id_outside_the_table_is_a_data_error() -> None:
    assert count_token_bytes(torch.tensor([0, 3, 3]), torch.tensor([1, 1, 1, 4])) == 9
    with pytest.raises(DataError, match=r"token id 300 has no byte length.*ids 0\.\.255"):
        count_token_bytes(torch.from_numpy(np.array([5, 300])), torch.ones(256))
