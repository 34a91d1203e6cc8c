"""Tokenizing chunks of documents, in this process or in N worker processes, results in order.

Each worker builds the tokenizer from the ``data.tokenizer`` spec itself (nothing but the spec
and the input list crosses to it), turns raw documents into text, tokenizes them, appends the
end-of-text id and sends each split's tokens back. The parent takes the results strictly in the
order of the chunks, so the output does not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import signal
from collections import deque
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from apt.trainops.data.shards.inputs import Chunk, InputSource, RawDocument, document_text
from apt.trainops.data.tokenizers import Tokenizer, build_tokenizer

__all__ = ["SPLITS", "ChunkTokens", "TokenizeJob", "is_val", "tokenize_chunks"]

#: The splits, in the order of their number in a worker's result.
SPLITS = ("train", "val")


@dataclass(frozen=True)
class TokenizeJob:
    """What a worker needs: the tokenizer spec, the inputs, how to read and split them."""

    tokenizer_spec: dict[str, Any]
    inputs: tuple[InputSource, ...]
    text_field: str
    val_fraction: float
    dtype: str


@dataclass(frozen=True)
class ChunkTokens:
    """One chunk, tokenized, per split (``SPLITS`` order).

    Attributes:
        tokens: the split's token stream of the chunk, each document followed by ``eos_id``.
        lengths: tokens of each of the split's documents (end-of-text included), int64.
        files: the input number of each of those documents, int64.
    """

    tokens: tuple[np.ndarray, ...]
    lengths: tuple[np.ndarray, ...]
    files: tuple[np.ndarray, ...]


def is_val(rel: str, pos: int, val_fraction: float) -> bool:
    """Whether document ``pos`` of the input at relative path ``rel`` is a validation document:
    the first 8 bytes of sha256(``rel`` NUL ``pos``) as a fraction of 2**64, below
    ``val_fraction``. Stable across machines, processes and worker counts."""
    if val_fraction <= 0.0:
        return False
    digest = hashlib.sha256(f"{rel}\0{pos}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2.0**64


class _Tokenizing:
    """A job with its tokenizer built (once per process)."""

    def __init__(self, job: TokenizeJob) -> None:
        self.job = job
        self.tokenizer: Tokenizer = build_tokenizer(job.tokenizer_spec)
        self.dtype = np.dtype(job.dtype)
        self.eos = np.array([self.tokenizer.eos_id], dtype=self.dtype)

    def __call__(self, documents: list[RawDocument]) -> ChunkTokens:
        job = self.job
        pieces: tuple[list[np.ndarray], ...] = ([], [])
        lengths: tuple[list[int], ...] = ([], [])
        files: tuple[list[int], ...] = ([], [])
        for number, pos, raw in documents:
            source = job.inputs[number]
            text = document_text(source, pos, raw, text_field=job.text_field)
            if not text:
                continue
            split = int(is_val(source.rel, pos, job.val_fraction))
            ids = self.tokenizer.encode_array(text)
            pieces[split].append(ids.astype(self.dtype, copy=False))
            pieces[split].append(self.eos)
            lengths[split].append(len(ids) + 1)
            files[split].append(number)
        empty = np.zeros(0, dtype=self.dtype)
        return ChunkTokens(
            tokens=tuple(np.concatenate(p) if p else empty for p in pieces),
            lengths=tuple(np.array(n, dtype=np.int64) for n in lengths),
            files=tuple(np.array(f, dtype=np.int64) for f in files),
        )


_WORKER: _Tokenizing | BaseException | None = None


def _init_worker(job: TokenizeJob) -> None:
    global _WORKER
    # Ctrl-C reaches the whole process group: the parent stops the pool, workers stay quiet.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _WORKER = _Tokenizing(job)
    except Exception as exc:  # a failing initializer makes Pool restart the worker forever
        _WORKER = exc


def _work(documents: list[RawDocument]) -> ChunkTokens:
    if isinstance(_WORKER, BaseException):
        raise _WORKER
    assert _WORKER is not None, "worker not initialized"
    return _WORKER(documents)


def _context() -> Any:
    # forkserver forks workers from a clean server process that imported this module once
    # (no torch import per worker, no copy of the parent's threads); spawn where it is missing.
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


def tokenize_chunks(
    job: TokenizeJob, chunks: Iterable[Chunk], *, workers: int
) -> Generator[tuple[Chunk, ChunkTokens], None, None]:
    """Each chunk with its tokens, in the order of ``chunks``.

    ``workers == 1`` tokenizes in this process; more start that many processes, with at most
    two chunks per worker in flight (``chunks`` is read only as fast as results are taken).

    Raises:
        DataError: a bad document (raised where it is met, in chunk order); ConfigError: the
            tokenizer spec does not build.
    """
    if workers == 1:
        tokenize = _Tokenizing(job)
        for chunk in chunks:
            yield chunk, tokenize(chunk.documents)
        return
    with _context().Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
        pending: deque[tuple[Chunk, Any]] = deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_work, (chunk.documents,))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()
