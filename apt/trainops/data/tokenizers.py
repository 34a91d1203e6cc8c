"""Tokenizers, chosen by ``data.tokenizer`` through :data:`TOKENIZERS`.

Only the byte-level tokenizer ships today: it needs no download and no training, so the quickstart
runs anywhere. Another tokenizer plugs in by implementing :class:`Tokenizer` and registering a
factory under a new name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from apt.core.config import TokenizerSpec, validate_options
from apt.core.config.base import Section
from apt.core.errors import DataError
from apt.core.registry import Registry

__all__ = [
    "TOKENIZERS",
    "ByteTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "count_token_bytes",
    "token_byte_lengths",
    "token_dtype",
    "tokenizer_fingerprint",
]


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer.

    Attributes:
        name: the registry name (``data.tokenizer``); part of the token-cache key.
        vocab_size: number of distinct ids; ids are ``0 .. vocab_size - 1``.
        eos_id: the id appended after every document when documents are packed together.
    """

    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        ...

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a 1-D array of :func:`token_dtype` ``(vocab_size)``."""
        ...

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; ids that cannot be decoded become U+FFFD, never an exception."""
        ...


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds every id of a ``vocab_size`` vocabulary."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


class ByteTokenizer:
    """UTF-8 byte-level tokenizer: one id per byte, 256 ids, no special tokens.

    ``eos_id`` is byte 0 (NUL), which does not occur in ordinary text; packing appends it after
    every document so the model sees where one file ends and the next begins.

    >>> tok = ByteTokenizer()
    >>> tok.encode("hé")
    [104, 195, 169]
    >>> tok.decode([104, 195, 169])
    'hé'
    """

    name = "byte"
    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` as a list of ints in ``0..255``."""
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of ``text`` as a ``uint8`` array (no copy of the bytes object)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids back to text.

        Invalid UTF-8 sequences, and ids outside ``0..255`` (a model with a larger vocabulary
        than the tokenizer can sample them), become U+FFFD instead of raising.
        """
        values = np.asarray(ids if hasattr(ids, "__array__") else list(ids), dtype=np.int64)
        values = values.reshape(-1)
        if values.size == 0:
            return ""
        valid = (values >= 0) & (values < 256)
        if valid.all():
            return values.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        # Decode each run of valid bytes separately so an out-of-range id never glues the bytes
        # around it into a character they do not form.
        parts: list[str] = []
        run: list[int] = []
        for value, ok in zip(values.tolist(), valid.tolist(), strict=True):
            if ok:
                run.append(value)
                continue
            parts.append(bytes(run).decode("utf-8", errors="replace"))
            parts.append("\ufffd")
            run = []
        parts.append(bytes(run).decode("utf-8", errors="replace"))
        return "".join(parts)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


#: Tokenizer factories by ``data.tokenizer`` name. A miss lists the valid names.
TOKENIZERS: Registry[Callable[[], Tokenizer]] = Registry("tokenizer")
TOKENIZERS.register("byte")(ByteTokenizer)


class _NoOptions(Section):
    """A tokenizer without options."""


def build_tokenizer(spec: TokenizerSpec | str) -> Tokenizer:
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
