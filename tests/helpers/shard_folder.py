"""Write small prepared shard folders for tests, in the format of
:mod:`apt.trainops.data.shards.index`, through its own writers (``atomic_write_bytes``,
``write_index``, ``shard_file``, ``docs_file`` and the dataclasses), so the reader is tested
against the documented format rather than against ``python -m apt data prepare``.

A plain module of ``tests/helpers`` (``tests/conftest.py`` puts the folder on ``sys.path``):
``from shard_folder import write_shard_folder, stdlib_texts``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apt.core.config import TokenizerSpec
from apt.trainops.data.corpus import read_documents, stdlib_corpus
from apt.trainops.data.shards.index import (
    InputFile,
    ShardIndex,
    ShardInfo,
    SplitInfo,
    TokenizerInfo,
    atomic_write_bytes,
    docs_file,
    shard_file,
    write_index,
)
from apt.trainops.data.tokenizers import build_tokenizer, tokenizer_fingerprint

__all__ = ["ShardFolder", "stdlib_texts", "write_shard_folder"]


@dataclass(frozen=True)
class ShardFolder:
    """What :func:`write_shard_folder` wrote: the folder, its index and each split's stream."""

    path: Path
    index: ShardIndex
    streams: dict[str, np.ndarray]  # split -> the whole token stream (int64)
    offsets: dict[str, np.ndarray]  # split -> where each document starts


def stdlib_texts(max_bytes: int, *, skip_bytes: int = 0) -> list[str]:
    """Standard-library sources (sorted files, the last one cut at the cap): ``max_bytes`` of
    UTF-8 text after the first ``skip_bytes``, one document per file."""
    texts: list[str] = []
    seen = 0
    for _, text in read_documents(stdlib_corpus(), max_bytes=skip_bytes + max_bytes):
        size = len(text.encode("utf-8"))
        if seen + size > skip_bytes:
            keep = text.encode("utf-8")[max(0, skip_bytes - seen) :]
            texts.append(keep.decode("utf-8", errors="ignore"))
        seen += size
    return [t for t in texts if t]


def write_shard_folder(
    folder: Path,
    splits: dict[str, Sequence[str]],
    *,
    shard_tokens: int = 1000,
    tokenizer: str | dict[str, Any] = "byte",
    dtype: str = "uint16",
) -> ShardFolder:
    """Tokenize each split's documents (eos after each), cut the stream into shards of
    ``shard_tokens`` ids (the last one shorter), write the shards, the document offsets and,
    last, ``index.json``.

    Args:
        folder: where to write (created).
        splits: split name (``train``, ``val``) -> its documents.
        shard_tokens: ids per shard.
        tokenizer: the ``data.tokenizer`` spec recorded in the index.
        dtype: ``uint16`` or ``uint32``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    spec = TokenizerSpec.model_validate(tokenizer)
    tok = build_tokenizer(spec)
    disk = np.dtype(dtype).newbyteorder("<")
    infos: dict[str, SplitInfo] = {}
    streams: dict[str, np.ndarray] = {}
    offsets: dict[str, np.ndarray] = {}
    for split, docs in splits.items():
        pieces, starts, at = [], [], 0
        for text in docs:
            ids = np.asarray([*tok.encode(text), tok.eos_id], dtype=np.int64)
            starts.append(at)
            pieces.append(ids)
            at += len(ids)
        stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        shards = []
        for number, begin in enumerate(range(0, len(stream), shard_tokens)):
            chunk = stream[begin : begin + shard_tokens].astype(disk)
            name = shard_file(split, number)
            atomic_write_bytes(folder / name, chunk)
            shards.append(ShardInfo(name, len(chunk), hashlib.sha256(chunk.tobytes()).hexdigest()))
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(starts, dtype="<i8"))
        atomic_write_bytes(folder / docs_file(split), buffer.getvalue())
        infos[split] = SplitInfo(tuple(shards), len(stream), len(docs), docs_file(split))
        streams[split] = stream
        offsets[split] = np.asarray(starts, dtype=np.int64)
    total_docs = sum(len(docs) for docs in splits.values())
    index = ShardIndex(
        dtype=dtype,
        shard_tokens=shard_tokens,
        tokenizer=TokenizerInfo(
            spec={"kind": spec.kind, **spec.options},
            vocab_size=tok.vocab_size,
            eos_id=tok.eos_id,
            fingerprint=tokenizer_fingerprint(tok),
        ),
        splits=infos,
        inputs=(
            InputFile(
                path="<test documents>",
                bytes=sum(len(t.encode("utf-8")) for d in splits.values() for t in d),
                documents=total_docs,
            ),
        ),
        val_fraction=len(splits.get("val", ())) / max(1, total_docs),
        text_field="text",
    )
    write_index(folder, index)
    return ShardFolder(folder, index, streams, offsets)
