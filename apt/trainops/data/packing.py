"""Packing: documents -> one token stream -> fixed-length (input, next-token label) sequences."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from apt.core.errors import DataError
from apt.trainops.data.tokenizers import Tokenizer, token_dtype

__all__ = ["CorpusStats", "PackedDataset", "num_sequences", "tokenize_documents"]


@dataclass(frozen=True)
class CorpusStats:
    """What one side of the data holds, for logs and the token cache.

    Attributes:
        files: files the side was read from (all listed files, even if a byte cap stopped early).
        documents: documents tokenized (files, or .jsonl lines).
        bytes: UTF-8 bytes of text read.
        tokens: tokens in the packed stream, separators included.
    """

    files: int
    documents: int
    bytes: int
    tokens: int


def tokenize_documents(
    docs: Iterable[str], tokenizer: Tokenizer, *, files: int = 0
) -> tuple[np.ndarray, CorpusStats]:
    """Tokenize ``docs`` and join them into one stream, ``tokenizer.eos_id`` after each document.

    Returns:
        ``(tokens, stats)``: a 1-D array of :func:`token_dtype` ``(tokenizer.vocab_size)``.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    pieces: list[np.ndarray] = []
    n_docs = n_bytes = 0
    for text in docs:
        ids = tokenizer.encode_array(text)
        pieces.append(ids.astype(dtype, copy=False))
        pieces.append(eos)
        n_docs += 1
        n_bytes += len(text.encode("utf-8"))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    return tokens, CorpusStats(files=files, documents=n_docs, bytes=n_bytes, tokens=len(tokens))


def num_sequences(num_tokens: int, seq_len: int) -> int:
    """How many ``seq_len`` sequences (each needing ``seq_len + 1`` tokens) a stream yields."""
    return max(0, (num_tokens - 1) // seq_len)


class PackedDataset(Dataset[dict[str, torch.Tensor]]):
    """Fixed-length language-modelling sequences cut from one token stream.

    Item ``i`` is the window ``tokens[i*T : i*T + T + 1]`` (``T = seq_len``): ``input_ids`` are
    its first ``T`` tokens and ``labels`` its last ``T``, i.e. each position's next token.
    Windows overlap by one token, so every token of the stream except the first is a label
    exactly once; the tail that does not fill a window is dropped.

    Args:
        tokens: the 1-D token stream (an in-memory array or a read-only memmap).
        seq_len: tokens per sequence, ``>= 1``.
        path: the ``.npy`` file ``tokens`` is memory-mapped from, if any. Workers started with
            ``spawn`` then re-open the file instead of receiving a pickled copy of the array.

    Raises:
        DataError: the stream is too short for one sequence.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, *, path: Path | None = None) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        if num_sequences(len(tokens), seq_len) < 1:
            raise DataError(
                f"{len(tokens)} tokens cannot fill one sequence of seq_len={seq_len} (needs "
                f"{seq_len + 1}). Add text, or lower data.seq_len."
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.path = path
        self._len = num_sequences(len(tokens), seq_len)

    def __len__(self) -> int:
        return self._len

    @property
    def num_tokens(self) -> int:
        """Length of the token stream."""
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"sequence {index} out of range (dataset has {self._len})")
        start = index * self.seq_len
        window = torch.from_numpy(
            np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)
        )  # (T + 1,)
        return {"input_ids": window[:-1], "labels": window[1:]}  # (T,), (T,)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.path is not None:
            state["tokens"] = None  # re-opened from the file in the receiving process
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.tokens is None:
            self.tokens = np.load(self.path, mmap_mode="r")

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"PackedDataset(sequences={self._len}, seq_len={self.seq_len}{where})"
