"""On-disk token cache: one ``.npy`` token stream per data side, memory-mapped when loaded.

An entry is two files, ``<side>-<key>.npy`` (the tokens) and ``<side>-<key>.json`` (its stats).
Both are written to a temporary name and renamed into place, the JSON last: an entry without its
JSON is debris from an interrupted write and is rebuilt. Any change to the file list, a file's
size or mtime, the tokenizer (its :func:`~apt.trainops.data.tokenizers.tokenizer_fingerprint`:
a BPE tokenizer with another vocabulary file is another tokenizer, whatever its name),
``seq_len``, the text field or the byte cap gives a new key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from apt.core.errors import DataError
from apt.trainops.data.corpus import CorpusFile
from apt.trainops.data.packing import CorpusStats
from apt.trainops.data.tokenizers import Tokenizer, tokenizer_fingerprint

__all__ = ["CACHE_FORMAT", "cache_key", "load_tokens", "save_tokens"]

log = logging.getLogger(__name__)

#: Bump when the token stream a given key produces changes (packing, separators, readers).
#: (Keying on the tokenizer's fingerprint instead of its name needed no bump: it changed every
#: key, so no entry of the name-keyed cache is ever read as one of the new.)
CACHE_FORMAT = 1


def cache_key(
    files: list[CorpusFile],
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    text_field: str,
    max_bytes: int | None,
) -> str:
    """sha256 over everything that decides the token stream of ``files``.

    Raises:
        DataError: a file cannot be stat-ed (it vanished or is not accessible).
    """
    digest = hashlib.sha256()
    header = {
        "format": CACHE_FORMAT,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "seq_len": seq_len,
        "text_field": text_field,
        "max_bytes": max_bytes,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for file in files:
        try:
            st = os.stat(file.path)
        except OSError as exc:
            raise DataError(
                f"cannot read {file.path}: {exc.strerror or exc}. Check that it exists and is "
                "readable, or remove it from the file list."
            ) from None
        digest.update(f"\n{file.path}\0{file.format}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def _entry(cache_dir: Path, side: str, key: str) -> tuple[Path, Path]:
    stem = f"{side}-{key[:32]}"
    return cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"


def load_tokens(
    cache_dir: Path, side: str, key: str, dtype: np.dtype
) -> tuple[np.ndarray, CorpusStats, Path] | None:
    """The cached stream for ``key`` as a read-only memmap, its stats and its path; or None.

    A missing, partial or inconsistent entry returns None (and logs why, if it was there).
    """
    npy, meta = _entry(cache_dir, side, key)
    if not meta.exists() or not npy.exists():
        return None
    try:
        info = json.loads(meta.read_text())
        stats = CorpusStats(**info["stats"])
        tokens = np.load(npy, mmap_mode="r")
        if info.get("key") != key or tokens.dtype != dtype or tokens.shape != (stats.tokens,):
            raise ValueError(f"entry does not match (dtype {tokens.dtype}, shape {tokens.shape})")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("token cache entry %s is unusable (%s); rebuilding it", npy, exc)
        return None
    return tokens, stats, npy


@contextlib.contextmanager
def _staged(final: Path) -> Iterator[Path]:
    """A temporary path next to ``final``, renamed onto it if the block succeeds."""
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".tmp-{final.name}-")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def save_tokens(
    cache_dir: Path, side: str, key: str, tokens: np.ndarray, stats: CorpusStats
) -> tuple[np.ndarray, Path]:
    """Write ``tokens`` and ``stats`` under ``key`` atomically; return the memmap and its path.

    Several ranks may write the same entry at once: each stages its own temporary file and the
    rename is atomic, so a reader always sees one complete entry.

    Raises:
        DataError: the cache folder cannot be created or written.
    """
    npy, meta = _entry(cache_dir, side, key)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _staged(npy) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=tokens.dtype, shape=tokens.shape)
            out[:] = tokens
            out.flush()
            del out
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        with _staged(meta) as tmp:
            tmp.write_text(json.dumps({"key": key, "stats": asdict(stats)}, indent=1))
    except OSError as exc:
        raise DataError(
            f"cannot write the token cache in {cache_dir}: {exc.strerror or exc}. Set "
            "data.cache_dir to a writable folder, or to null to keep tokens in memory."
        ) from None
    return np.load(npy, mmap_mode="r"), npy
