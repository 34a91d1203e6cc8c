"""Tokenizers, chosen by ``data.tokenizer`` through :data:`TOKENIZERS`.

``byte`` (the default: UTF-8 bytes, nothing to train or download), ``bpe`` (a byte-level BPE
``tokenizer.json`` trained by ``python -m apt data tokenizer``) and ``hf`` (any ``tokenizer.json``
or Hugging Face tokenizer folder already on disk). The classes live in
:mod:`apt.model.tokenizers` because they travel with the model; another tokenizer plugs in by
implementing :class:`Tokenizer` and registering a factory under a new name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import Field

from apt.core.config import TokenizerSpec, validate_options
from apt.core.config.base import Section
from apt.core.errors import DataError
from apt.core.registry import Registry
from apt.model.tokenizers import ByteTokenizer, JSONTokenizer, Tokenizer, token_dtype

__all__ = [
    "TOKENIZERS",
    "ByteTokenizer",
    "JSONTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "count_token_bytes",
    "token_byte_lengths",
    "token_dtype",
    "tokenizer_fingerprint",
]


class TokenizerFileOptions(Section):
    """Options of the ``bpe`` and ``hf`` tokenizers."""

    path: str = Field(description="A tokenizer.json, or a folder holding one.")
    eos_token: str | None = Field(
        None,
        description="The end-of-text token (None: <|endoftext|>, </s>, <|end_of_text|>, <eos>, "
        "<|im_end|> or [SEP], the first the vocabulary has).",
    )


def _file_tokenizer(kind: str) -> Callable[..., Tokenizer]:
    def build(path: str, eos_token: str | None = None) -> Tokenizer:
        return JSONTokenizer(path, kind=kind, eos_token=eos_token)

    build.Options = TokenizerFileOptions  # type: ignore[attr-defined]
    build.__doc__ = f"The {kind!r} tokenizer read from a tokenizer.json."
    return build


#: Tokenizer factories by ``data.tokenizer`` name. A miss lists the valid names.
TOKENIZERS: Registry[Callable[..., Tokenizer]] = Registry("tokenizer")
TOKENIZERS.register("byte")(ByteTokenizer)
TOKENIZERS.register("bpe")(_file_tokenizer("bpe"))
TOKENIZERS.register("hf")(_file_tokenizer("hf"))


class _NoOptions(Section):
    """A tokenizer without options."""


def build_tokenizer(spec: TokenizerSpec | str | Mapping[str, Any]) -> Tokenizer:
    """Build the tokenizer ``spec`` names (``data.tokenizer``), with its options.

    A registered factory takes its options as keywords; its ``Options`` attribute (a config
    section, default: none) validates them.

    Raises:
        ConfigError: the name is not registered (the message lists the valid names), or an
            option the tokenizer does not have.
    """
    spec = TokenizerSpec.model_validate(spec)
    factory = TOKENIZERS.lookup(spec.kind)
    options_model = getattr(factory, "Options", _NoOptions)
    options = validate_options(options_model, spec.options, where="data.tokenizer")
    return factory(**options.model_dump())


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A sha256 that changes whenever the ids ``tokenizer`` gives could change: its name, size
    and end-of-text id, and for a tokenizer with a ``serialized() -> str`` method (the BPE and
    HF tokenizers: their whole ``tokenizer.json``) that text too."""
    digest = hashlib.sha256(
        f"{tokenizer.name}\0{tokenizer.vocab_size}\0{tokenizer.eos_id}".encode()
    )
    serialized = getattr(tokenizer, "serialized", None)
    if callable(serialized):
        digest.update(b"\0" + serialized().encode("utf-8"))
    return digest.hexdigest()


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """How many UTF-8 bytes of text each id stands for: the denominator of bits per byte.

    The byte tokenizer: 1 for every id. Another tokenizer: ``len(tokenizer.token_bytes(i))``
    when it has a ``token_bytes(id) -> bytes`` method (needed by byte-level BPE, whose single
    ids can be parts of one character), else the UTF-8 length of ``tokenizer.decode([i])``.

    Returns:
        An int64 tensor of ``tokenizer.vocab_size`` entries, on the CPU.
    """
    if isinstance(tokenizer, ByteTokenizer):
        return torch.ones(tokenizer.vocab_size, dtype=torch.int64)
    own = getattr(tokenizer, "token_bytes", None)
    ids = range(tokenizer.vocab_size)
    if callable(own):
        lengths = [len(own(i)) for i in ids]
    else:
        lengths = [len(tokenizer.decode([i]).encode("utf-8")) for i in ids]
    return torch.tensor(lengths, dtype=torch.int64)


def count_token_bytes(ids: torch.Tensor, lengths: torch.Tensor) -> int:
    """The UTF-8 bytes ``ids`` stand for: ``lengths[ids].sum()`` (``lengths`` from
    :func:`token_byte_lengths`; both on the CPU).

    Raises:
        DataError: an id outside the table (the data was made with another tokenizer).
    """
    if ids.numel() == 0:
        return 0
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= len(lengths):
        bad = low if low < 0 else high
        raise DataError(
            f"token id {bad} has no byte length: the table covers ids 0..{len(lengths) - 1}. "
            "Build token_bytes with token_byte_lengths() of the tokenizer that made the data."
        )
    return int(lengths[ids].sum())
