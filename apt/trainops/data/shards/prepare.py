"""``python -m apt data prepare``: tokenize a corpus once into memory-mappable token shards.

The inputs (sorted by their path relative to the folder holding them all, then each file's
documents in order) are read by this process in chunks, tokenized by ``workers`` processes and
written here strictly in chunk order, so the shards and the index are byte-identical whatever
the number of workers. Each document goes to ``val`` with probability ``val_fraction``, decided
by a hash of its file's relative path and its position in the file
(:func:`~apt.trainops.data.shards.workers.is_val`).

Resumable: the folder holds ``progress.json`` (atomically replaced after every chunk that
finished a shard) until ``index.json`` is written. It records the options' fingerprint, where
reading continues and, per split, the finished shards and how much of the open shard's partial
file counts (:mod:`~apt.trainops.data.shards.writer`). The same command run again reopens the
partial files at the recorded length and reads on from the recorded position, so the result is
the bytes an uninterrupted run writes. The format is in :mod:`apt.trainops.data.shards.index`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from apt.core.config import TokenizerSpec
from apt.core.errors import ConfigError, DataError
from apt.trainops.data.shards.index import (
    INDEX_FILE,
    SHARD_FORMAT,
    InputFile,
    ShardIndex,
    SplitInfo,
    TokenizerInfo,
    atomic_write_bytes,
    read_index,
    write_index,
)
from apt.trainops.data.shards.inputs import InputSource, Position, read_chunks, resolve_inputs
from apt.trainops.data.shards.workers import SPLITS, TokenizeJob, tokenize_chunks
from apt.trainops.data.shards.writer import PARTIAL_SUFFIX, SplitState, SplitWriter, fsync_folder
from apt.trainops.data.tokenizers import build_tokenizer, tokenizer_fingerprint

__all__ = [
    "DEFAULT_SHARD_TOKENS",
    "DEFAULT_VAL_FRACTION",
    "PROGRESS_FILE",
    "prepare_shards",
    "shard_dtype",
]

log = logging.getLogger(__name__)

#: Tokens per shard: 200 MB of uint16 (400 MB of uint32), few files for a large corpus.
DEFAULT_SHARD_TOKENS = 100_000_000
#: Share of documents held out for validation: 1% (10 MB of a 1 GB corpus).
DEFAULT_VAL_FRACTION = 0.01
#: The progress record of an unfinished preparation.
PROGRESS_FILE = "progress.json"


def shard_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` for a vocabulary of at most 65536 ids, else ``uint32``. Shards never use
    ``uint8`` (even for the byte tokenizer's 256 ids): readers handle two dtypes only."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _check_options(workers: int, val_fraction: float, shard_tokens: int, text_field: str) -> None:
    if workers < 1:
        raise ConfigError(f"--workers (workers) must be >= 1, got {workers}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(
            f"--val-fraction (val_fraction) must be in [0, 1), got {val_fraction}; 0 makes no "
            "validation split"
        )
    if shard_tokens < 1:
        raise ConfigError(f"--shard-tokens (shard_tokens) must be >= 1, got {shard_tokens}")
    if not text_field:
        raise ConfigError("--text-field (text_field) must name a key / column, got ''")


def _output_folder(output: Path) -> Path:
    if output.exists() and not output.is_dir():
        raise DataError(
            f"--output {output} is a file. Give a folder: a new one, or one an earlier "
            "`data prepare` wrote."
        )
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"--output {output}: cannot create the folder ({exc.strerror or exc}). Give a "
            "writable folder."
        ) from None
    return output


def _options(
    sources: list[InputSource],
    tokenizer: TokenizerInfo,
    *,
    dtype: np.dtype,
    shard_tokens: int,
    val_fraction: float,
    text_field: str,
) -> dict[str, Any]:
    """Everything that decides the output: equal options, equal bytes."""
    return {
        "format": dict(SHARD_FORMAT),
        "dtype": dtype.name,
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
        "text_field": text_field,
        "tokenizer": asdict(tokenizer),
        "inputs": [
            {"path": str(s.path), "bytes": s.bytes, "mtime_ns": s.mtime_ns} for s in sources
        ],
    }


def _fingerprint(options: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()


def _refuse(folder: Path, what: str, old: dict[str, Any], new: dict[str, Any]) -> DataError:
    differs = ", ".join(k for k in new if old.get(k) != new[k]) or "the options"
    return DataError(
        f"--output {folder} holds {what} from other inputs or options (they differ in: "
        f"{differs}). Use a new --output folder, or delete {folder} to prepare it again."
    )


def _finished(folder: Path, options: dict[str, Any]) -> ShardIndex | None:
    """The folder's index when it was prepared with ``options``; None when it has none.

    Raises:
        DataError: it was prepared with other inputs or options, or its index is unreadable.
    """
    if not (folder / INDEX_FILE).exists():
        return None
    index = read_index(folder, key="--output")
    have = {
        "format": index.format,
        "dtype": index.dtype,
        "shard_tokens": index.shard_tokens,
        "val_fraction": index.val_fraction,
        "text_field": index.text_field,
        "tokenizer": asdict(index.tokenizer),
        "inputs": [{"path": i.path, "bytes": i.bytes} for i in index.inputs],
    }
    want = {**options, "inputs": [{k: i[k] for k in ("path", "bytes")} for i in options["inputs"]]}
    if json.loads(json.dumps(have)) != json.loads(json.dumps(want)):
        raise _refuse(folder, "shards prepared", have, want)
    return index


def _progress(folder: Path, options: dict[str, Any]) -> dict[str, Any] | None:
    """The progress record to go on from; None for an empty folder.

    Raises:
        DataError: the folder holds other files, or a preparation with other options.
    """
    path = folder / PROGRESS_FILE
    if not path.exists():
        foreign = [p.name for p in folder.iterdir() if not p.name.endswith(".tmp")]
        if foreign:
            raise DataError(
                f"--output {folder} is not empty and holds no preparation ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}). Give a new or empty folder."
            )
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        fingerprint = record["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{path} cannot be read ({exc}). Delete {folder} and prepare again."
        ) from None
    if fingerprint == _fingerprint(options):
        return dict(record)
    if any(split.get("shards") for split in record.get("splits", {}).values()):
        raise _refuse(folder, "an unfinished preparation", record.get("options", {}), options)
    # Nothing finished (it stopped on a bad input, say): start over, with the new options.
    log.info("%s: its unfinished preparation finished no shard; starting over", folder)
    for leftover in folder.iterdir():
        if leftover.suffix in (".bin", ".npy") or leftover.name.startswith("."):
            leftover.unlink()
    path.unlink()
    return None


def _write_progress(folder: Path, record: dict[str, Any]) -> None:
    """Replace ``progress.json`` (after the partial files it counts were made durable)."""
    atomic_write_bytes(folder / PROGRESS_FILE, (json.dumps(record, indent=1) + "\n").encode())


def _cleanup(folder: Path) -> None:
    """Remove what only an unfinished preparation needs (once ``index.json`` is written)."""
    for path in folder.iterdir():
        if path.name.startswith(".") and path.name.endswith((PARTIAL_SUFFIX, ".tmp")):
            path.unlink(missing_ok=True)
    (folder / PROGRESS_FILE).unlink(missing_ok=True)


def _tokenizer_info(spec: Mapping[str, Any] | str) -> TokenizerInfo:
    validated = TokenizerSpec.model_validate(spec)
    plain = {"kind": validated.kind, **validated.options}
    tokenizer = build_tokenizer(validated)
    return TokenizerInfo(
        spec=plain,
        vocab_size=int(tokenizer.vocab_size),
        eos_id=int(tokenizer.eos_id),
        fingerprint=tokenizer_fingerprint(tokenizer),
    )


def prepare_shards(
    inputs: Iterable[str | Path] | str | Path,
    output: str | Path,
    *,
    tokenizer_spec: Mapping[str, Any] | str,
    workers: int = 1,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    text_field: str = "text",
    progress: bool = False,
) -> ShardIndex:
    """Tokenize ``inputs`` into token shards in ``output``, or finish an interrupted run.

    Args:
        inputs: paths or globs of .txt (one document a file), .jsonl (one a line) and .parquet
            (one a row) files.
        output: the folder (created); a new or empty one, or one an earlier call with the same
            arguments wrote (then it is completed, or, when finished, returned as it is).
        tokenizer_spec: the ``data.tokenizer`` spec (``{"kind": "byte"}``, ``{"kind": "bpe",
            "path": ...}``); each worker builds the tokenizer from it.
        workers: tokenizing processes (1: this process).
        val_fraction: share of documents that go to the ``val`` split, in ``[0, 1)``; 0: the
            index has only a ``train`` split.
        shard_tokens: tokens per shard file (the last one of a split may hold fewer).
        text_field: the .jsonl key / Parquet column that holds the text.
        progress: show a progress bar (documents, tokens, input MB/s) on stderr.

    Returns:
        The index written to ``output/index.json``.

    Raises:
        ConfigError: a bad option or tokenizer spec.
        DataError: no input matched, a file cannot be read or holds a bad record (named with
            its line / row and the fix), ``output`` is a file, not empty, or holds a preparation
            with other inputs or options.
    """
    _check_options(workers, val_fraction, shard_tokens, text_field)
    patterns = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    sources = resolve_inputs([str(p) for p in patterns])
    tokenizer = _tokenizer_info(tokenizer_spec)
    dtype = shard_dtype(tokenizer.vocab_size)
    options = _options(
        sources,
        tokenizer,
        dtype=dtype,
        shard_tokens=shard_tokens,
        val_fraction=val_fraction,
        text_field=text_field,
    )
    folder = _output_folder(Path(output).expanduser())
    done = _finished(folder, options)
    if done is not None:
        _cleanup(folder)
        log.info("%s is already prepared (its index.json matches): nothing to do", folder)
        return done
    record = _progress(folder, options) or {
        "fingerprint": _fingerprint(options),
        "options": options,
        "position": [0, 0, 0],
        "splits": {
            split: SplitState(file_documents=[0] * len(sources)).to_dict()
            for split in (SPLITS if val_fraction > 0 else SPLITS[:1])
        },
    }
    _write_progress(folder, record)  # from here on the folder is this preparation's
    job = TokenizeJob(dict(tokenizer.spec), tuple(sources), text_field, val_fraction, dtype.name)
    began = time.perf_counter()
    splits, documents = _run(
        folder, record, job, shard_tokens=shard_tokens, workers=workers, progress=progress
    )
    index = ShardIndex(
        dtype=dtype.name,
        shard_tokens=shard_tokens,
        tokenizer=tokenizer,
        splits=splits,
        inputs=tuple(
            InputFile(str(s.path), s.bytes, n) for s, n in zip(sources, documents, strict=True)
        ),
        val_fraction=val_fraction,
        text_field=text_field,
    )
    write_index(folder, index)
    _cleanup(folder)
    seconds = time.perf_counter() - began
    summary = "; ".join(
        f"{name} {info.tokens:,} tokens in {len(info.shards)} shard(s), {info.documents:,} "
        "documents"
        for name, info in splits.items()
    )
    log.info("prepared %s: %s (%.1f s this run)", folder, summary, seconds)
    return index


def _run(
    folder: Path,
    record: dict[str, Any],
    job: TokenizeJob,
    *,
    shard_tokens: int,
    workers: int,
    progress: bool,
) -> tuple[dict[str, SplitInfo], list[int]]:
    """Tokenize from the recorded position to the end; the splits and each input's documents.

    Raises:
        DataError: a bad document, or no text at all.
    """
    dtype = np.dtype(job.dtype)
    states = {name: SplitState.from_dict(s) for name, s in record["splits"].items()}
    writers: dict[str, SplitWriter] = {}
    start = Position(*record["position"])
    bar = _progress_bar(job.inputs, start, enabled=progress)
    try:
        for name, state in states.items():
            writers[name] = SplitWriter(
                folder, name, dtype=dtype, shard_tokens=shard_tokens, state=state
            )
        chunks = read_chunks(list(job.inputs), start, text_field=job.text_field)
        with closing(tokenize_chunks(job, chunks, workers=workers)) as results:
            for chunk, tokens in results:
                finished = False
                for number, name in enumerate(SPLITS):
                    if name in writers:
                        finished |= writers[name].append(
                            tokens.tokens[number], tokens.lengths[number], tokens.files[number]
                        )
                if finished:
                    _checkpoint(folder, record, writers, chunk.end)
                docs = sum(s.documents for s in states.values())
                total = sum(s.tokens for s in states.values())
                bar.set_postfix_str(f"{docs:,} docs, {total:,} tokens", refresh=False)
                bar.update(chunk.input_bytes)
        documents = [sum(n) for n in zip(*(s.file_documents for s in states.values()), strict=True)]
        if not any(documents):
            raise DataError(
                f"--input: the {len(job.inputs)} input file(s) hold no text (every document "
                "is empty). Check the files, and --text-field."
            )
    except BaseException:
        for writer in writers.values():
            writer.close()
        raise
    finally:
        bar.close()
    return {name: writer.finish() for name, writer in writers.items()}, documents


def _checkpoint(
    folder: Path, record: dict[str, Any], writers: dict[str, SplitWriter], end: Position
) -> None:
    """Record that everything before ``end`` is written (durably, then the record)."""
    for writer in writers.values():
        writer.sync()
    fsync_folder(folder)
    record["position"] = [end.file, end.pos, end.offset]
    record["splits"] = {name: writer.state.to_dict() for name, writer in writers.items()}
    _write_progress(folder, record)


def _progress_bar(inputs: tuple[InputSource, ...], start: Position, *, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    done = sum(s.bytes for s in inputs[: start.file]) + start.offset
    return tqdm(
        total=sum(s.bytes for s in inputs),
        initial=done,
        unit="B",
        unit_scale=True,
        desc="data prepare",
        disable=not enabled,
        dynamic_ncols=True,
    )
