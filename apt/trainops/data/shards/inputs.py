"""The inputs of ``data prepare``: .txt, .jsonl and .parquet files, read as numbered documents.

A .txt file is one document, a .jsonl line one document (blank lines are none), a Parquet row one
document. A document's *position* is its number in its file: 0 for a .txt file, the 0-based line
number of a .jsonl file, the row of a Parquet file. ``(file number, position)`` names a document
for the train/validation split and for resuming.

The preparing process reads raw documents (:func:`read_chunks`: bytes of a file or a line, or
Parquet strings) in order and in chunks; the tokenizing workers turn them into text
(:func:`document_text`), where a bad line fails with corpus.py's messages.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from apt.core.errors import DataError
from apt.trainops.data.corpus import (
    CorpusFile,
    _common_root,
    _decode,
    _expand,
    _record_text,
    _unreadable,
)

__all__ = [
    "INPUT_SUFFIXES",
    "Chunk",
    "InputSource",
    "Position",
    "document_text",
    "read_chunks",
    "resolve_inputs",
]

InputFormat = Literal["text", "jsonl", "parquet"]

#: Extensions ``data prepare`` reads, and the format each is read as.
INPUT_SUFFIXES: dict[str, InputFormat] = {".txt": "text", ".jsonl": "jsonl", ".parquet": "parquet"}

#: Raw text bytes per chunk sent to a worker: large enough that the per-chunk cost (pickling,
#: one result) is small, small enough that the in-flight chunks stay a few MB.
CHUNK_BYTES = 1 << 20

_PARQUET_ROWS = 1024  # rows read from a Parquet file at a time


@dataclass(frozen=True)
class InputSource:
    """One input file.

    Attributes:
        path: absolute path, as listed (not the symlink target).
        rel: POSIX path relative to the folder holding all the inputs: the sort key and, with
            a document's position, the split key (moving the whole folder changes neither).
        format: how the file is read.
        bytes: its size.
        mtime_ns: its modification time (part of the options fingerprint: a changed file is
            not resumed into).
    """

    path: Path
    rel: str
    format: InputFormat
    bytes: int
    mtime_ns: int

    def corpus_file(self) -> CorpusFile:
        """The same file for corpus.py's readers and messages (user files: strict UTF-8)."""
        return CorpusFile(self.path, self.rel, "jsonl" if self.format == "jsonl" else "text")


@dataclass(frozen=True, order=True)
class Position:
    """Where reading resumes: document ``pos`` of input ``file``; ``offset`` is the byte
    offset of that line in a .jsonl file (so a resume seeks instead of re-reading)."""

    file: int
    pos: int
    offset: int = 0


#: One raw document: (input number, position, the file's or line's bytes / a Parquet string).
RawDocument = tuple[int, int, Any]


@dataclass(frozen=True)
class Chunk:
    """Consecutive raw documents, where reading continues after them, and the input bytes they
    stand for (for the progress bar)."""

    documents: list[RawDocument]
    end: Position
    input_bytes: int


def resolve_inputs(patterns: Iterable[str], *, key: str = "--input") -> list[InputSource]:
    """Expand paths and globs (``**`` recursive, ``~`` expanded) into the sorted, de-duplicated
    inputs, as :func:`apt.trainops.data.corpus.resolve_files` does, with .parquet too.

    Raises:
        DataError: a pattern matches nothing or names a folder, a file has an unsupported type
            or cannot be stat-ed, or no pattern was given.
    """
    paths: dict[Path, Path] = {}
    for pattern in patterns:
        for path in _expand(pattern, key):
            if path.suffix.lower() not in INPUT_SUFFIXES:
                raise DataError(
                    f"{key}: {path} has an unsupported type {path.suffix or '(no extension)'!r}. "
                    "data prepare reads plain UTF-8 text (.txt), JSON lines (.jsonl) and Parquet "
                    "(.parquet); convert the file or narrow the glob, e.g. '*.jsonl'."
                )
            paths.setdefault(path.resolve(), Path(os.path.abspath(path)))
    if not paths:
        raise DataError(f"{key} is empty. List the files or globs to read.")
    listed = list(paths.values())
    root = _common_root(listed)
    found = []
    for path in listed:
        try:
            st = path.stat()
        except OSError as exc:
            raise _unreadable(CorpusFile(path, path.name), exc) from None
        fmt = INPUT_SUFFIXES[path.suffix.lower()]
        rel = path.relative_to(root).as_posix()
        found.append(InputSource(path, rel, fmt, st.st_size, st.st_mtime_ns))
    return sorted(found, key=lambda f: f.rel)


def read_chunks(inputs: list[InputSource], start: Position, *, text_field: str) -> Iterator[Chunk]:
    """The raw documents of ``inputs`` from ``start`` on, in order, cut into chunks of about
    :data:`CHUNK_BYTES`. Every chunk holds at least one document.

    Raises:
        DataError: a file cannot be read, or (Parquet) has no such column, a null or non-text
            value, or pyarrow is missing; the message names the file and the fix.
    """
    batch: list[RawDocument] = []
    size = 0
    for number in range(start.file, len(inputs)):
        first = start if number == start.file else Position(number, 0)
        for doc, end, nbytes in _documents(inputs[number], number, first, text_field):
            batch.append(doc)
            size += nbytes
            if size >= CHUNK_BYTES:
                yield Chunk(batch, end, size)
                batch, size = [], 0
    if batch:
        yield Chunk(batch, Position(len(inputs), 0), size)


def _documents(
    source: InputSource, number: int, start: Position, text_field: str
) -> Iterator[tuple[RawDocument, Position, int]]:
    """``(raw document, where reading continues after it, its input bytes)`` of one file."""
    if source.format == "text":
        if start.pos == 0:
            yield (number, 0, _read_bytes(source)), Position(number + 1, 0), source.bytes
    elif source.format == "jsonl":
        yield from _jsonl_lines(source, number, start)
    else:
        yield from _parquet_rows(source, number, start, text_field)


def _read_bytes(source: InputSource) -> bytes:
    try:
        return source.path.read_bytes()
    except OSError as exc:
        raise _unreadable(source.corpus_file(), exc) from None


def _jsonl_lines(
    source: InputSource, number: int, start: Position
) -> Iterator[tuple[RawDocument, Position, int]]:
    pos, offset = start.pos, start.offset
    try:
        with open(source.path, "rb") as fh:
            fh.seek(offset)
            for line in fh:
                offset += len(line)
                if line.strip():
                    yield (number, pos, line), Position(number, pos + 1, offset), len(line)
                pos += 1
    except OSError as exc:
        raise _unreadable(source.corpus_file(), exc) from None


def _pyarrow_parquet(source: InputSource) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{source.path} is a Parquet file, and reading Parquet needs pyarrow, which is not "
            "installed. Install it with `pip install pyarrow` (or `pip install "
            "'apt-transformer[parquet]'`), or convert the file to .jsonl."
        ) from None
    return pq


def _parquet_rows(
    source: InputSource, number: int, start: Position, text_field: str
) -> Iterator[tuple[RawDocument, Position, int]]:
    pq = _pyarrow_parquet(source)
    import pyarrow as pa
    import pyarrow.compute as pc

    where = str(source.path)
    try:
        parquet = pq.ParquetFile(source.path)
    except OSError as exc:
        raise _unreadable(source.corpus_file(), exc) from None
    except (pa.ArrowException, ValueError) as exc:
        raise DataError(
            f"cannot read {where} as Parquet ({exc}). Check that it is a complete Parquet file, "
            "or remove it from the inputs."
        ) from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        columns = ", ".join(map(repr, schema.names[:8])) or "none"
        raise DataError(
            f"{where}: no {text_field!r} column (its columns: {columns}). Pass --text-field "
            "(text_field=) with the column that holds the text."
        )
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(
            f"{where}: column {text_field!r} holds {kind}, not text. Pass --text-field "
            "(text_field=) with the column that holds the text."
        )
    rows = max(1, parquet.metadata.num_rows)
    row = 0
    for group in range(parquet.num_row_groups):
        group_rows = parquet.metadata.row_group(group).num_rows
        if row + group_rows <= start.pos:  # wholly before the resume point: not read at all
            row += group_rows
            continue
        batches = parquet.iter_batches(_PARQUET_ROWS, row_groups=[group], columns=[text_field])
        for batch in batches:
            column = batch.column(0)
            if column.null_count:
                first = row + int(pc.index(pc.is_null(column), True).as_py())
                raise DataError(
                    f"{where}: row {first}: {text_field!r} is null. Drop the rows without text, "
                    "or fill them, and prepare again."
                )
            share = source.bytes / rows  # the progress bar counts file bytes
            for text in column.to_pylist():
                if row >= start.pos and text:
                    yield (number, row, text), Position(number, row + 1), int(share) or 1
                row += 1


def document_text(source: InputSource, pos: int, raw: Any, *, text_field: str) -> str:
    """The text of one raw document of ``source`` (an empty string: no document).

    Raises:
        DataError: not UTF-8, or (.jsonl) not a JSON object with a string under ``text_field``;
            the message names the file, the line and the fix (corpus.py's messages).
    """
    if source.format == "parquet":
        return str(raw)
    file = source.corpus_file()
    if source.format == "text":
        return _decode(raw, file, truncated=False)
    try:
        return _record_text(file, pos + 1, raw, text_field)
    except DataError as exc:
        # corpus.py speaks of the training config's key; here the option is text_field.
        raise DataError(str(exc).replace("data.text_field", "--text-field (text_field=)")) from None
