"""Where the text comes from: the Python standard library, or the user's .txt / .jsonl files.

A corpus is a sorted list of :class:`CorpusFile`. Each carries a path relative to the corpus
root; that relative path (never the absolute one) decides the train/validation split, so the
split is the same on every machine that holds the same files.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from apt.core.errors import DataError

__all__ = [
    "SUPPORTED_SUFFIXES",
    "CorpusFile",
    "python_stdlib_files",
    "read_documents",
    "resolve_files",
    "stdlib_corpus",
]

#: Extensions read by ``source: files``, and the format each is read as.
SUPPORTED_SUFFIXES: dict[str, Literal["text", "jsonl"]] = {".txt": "text", ".jsonl": "jsonl"}

_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class CorpusFile:
    """One file of a corpus.

    Attributes:
        path: absolute path.
        rel: POSIX path relative to the corpus root; the split key and the sort key.
        format: ``text`` (the whole file is one document) or ``jsonl`` (one document a line).
        errors: how invalid UTF-8 is handled: ``strict`` (user files: a DataError) or
            ``replace`` (standard-library files, a few of which are deliberately mis-encoded).
    """

    path: Path
    rel: str
    format: Literal["text", "jsonl"] = "text"
    errors: Literal["strict", "replace"] = "strict"


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def python_stdlib_files() -> list[Path]:
    """The ``.py`` files of the running interpreter's standard library, sorted by relative path.

    ``site-packages`` / ``dist-packages`` (third-party code) are skipped.

    Raises:
        DataError: the standard library has no ``.py`` files (a stripped, bytecode-only install).
    """
    return [f.path for f in stdlib_corpus()]


def stdlib_corpus() -> list[CorpusFile]:
    """:func:`python_stdlib_files` as :class:`CorpusFile` entries (relative to the stdlib root)."""
    root = _stdlib_root()
    found: list[CorpusFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning here (not filtering afterwards) keeps a big site-packages from being walked.
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath, name)
                found.append(CorpusFile(path, path.relative_to(root).as_posix(), "text", "replace"))
    if not found:
        raise DataError(
            f"data.source 'python_stdlib': no .py files under {root} (a bytecode-only Python "
            "install?). Use source: files with your own train_files instead."
        )
    return sorted(found, key=lambda f: f.rel)


def _expand(pattern: str, key: str) -> list[Path]:
    expanded = os.path.expanduser(pattern)
    if glob.has_magic(expanded):
        matches = [Path(p) for p in glob.glob(expanded, recursive=True)]
        files = [p for p in matches if p.is_file()]
        if not files:
            raise DataError(
                f"{key}: no file matches {pattern!r} (relative paths are taken from {Path.cwd()}). "
                "Fix the pattern, or give an absolute path."
            )
        return files
    path = Path(expanded)
    if path.is_dir():
        raise DataError(
            f"{key}: {pattern!r} is a folder. Name the files in it with a glob, e.g. "
            f"'{pattern.rstrip('/')}/*.txt' or '{pattern.rstrip('/')}/**/*.jsonl'."
        )
    if not path.is_file():
        raise DataError(
            f"{key}: file {pattern!r} does not exist (relative paths are taken from "
            f"{Path.cwd()}). Fix the path, or give an absolute one."
        )
    return [path]


def _common_root(paths: list[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def resolve_files(patterns: Iterable[str], *, key: str) -> list[CorpusFile]:
    """Expand paths and globs (``**`` recursive, ``~`` expanded) into a sorted, de-duplicated list.

    Relative paths are taken from the folder that holds all the matched files, so moving the
    whole data folder changes neither the order nor the split.

    Args:
        patterns: file paths or globs.
        key: the config key the patterns came from, for error messages (``data.train_files``).

    Raises:
        DataError: a pattern matches nothing, names a folder, or a file has an unsupported type.
    """
    # Keyed by the real file (two names of one file are read once); the value is the absolute
    # path as listed, not the symlink target, so relative paths follow the folder layout.
    paths: dict[Path, Path] = {}
    for pattern in patterns:
        for path in _expand(pattern, key):
            suffix = path.suffix.lower()
            if suffix not in SUPPORTED_SUFFIXES:
                raise DataError(
                    f"{key}: {path} has an unsupported type {path.suffix or '(no extension)'!r}. "
                    "APT reads plain UTF-8 text (.txt) and JSON lines (.jsonl); convert the file "
                    "or narrow the glob, e.g. '*.txt'."
                )
            paths.setdefault(path.resolve(), Path(os.path.abspath(path)))
    if not paths:
        raise DataError(f"{key} is empty. List the files or globs to read.")
    listed = list(paths.values())
    root = _common_root(listed)
    files = [
        CorpusFile(p, p.relative_to(root).as_posix(), SUPPORTED_SUFFIXES[p.suffix.lower()])
        for p in listed
    ]
    return sorted(files, key=lambda f: f.rel)


def _decode(data: bytes, file: CorpusFile, *, truncated: bool) -> str:
    try:
        return data.decode("utf-8", errors=file.errors)
    except UnicodeDecodeError as exc:
        if truncated and exc.end == len(data) and exc.reason == "unexpected end of data":
            # The byte cap cut a multi-byte character in half; drop the partial character.
            return data[: exc.start].decode("utf-8")
        raise DataError(
            f"{file.path} is not valid UTF-8 (byte {exc.start}: {exc.reason}). Re-encode it as "
            "UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or remove it from the file list."
        ) from None


def _unreadable(file: CorpusFile, exc: OSError) -> DataError:
    return DataError(
        f"cannot read {file.path}: {exc.strerror or exc}. Check that it exists and is readable "
        "(permissions), or remove it from the file list."
    )


def _read_text(file: CorpusFile, limit: int | None) -> Iterator[str]:
    try:
        with open(file.path, "rb") as fh:
            data = fh.read() if limit is None else fh.read(limit)
            truncated = limit is not None and fh.read(1) != b""
    except OSError as exc:
        raise _unreadable(file, exc) from None
    yield _decode(data, file, truncated=truncated)


def _record_text(file: CorpusFile, lineno: int, line: bytes, text_field: str) -> str:
    where = f"{file.path}:{lineno}"
    try:
        record = json.loads(line)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{where}: the line is not valid UTF-8 ({exc.reason}). Re-encode the file as UTF-8."
        ) from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{where}: not valid JSON ({exc.msg}, column {exc.colno}). Each line of a .jsonl "
            "file must be one complete JSON object; fix or delete that line."
        ) from None
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected a JSON object with a {text_field!r} key, got "
            f'{type(record).__name__}. Each line must look like {{{text_field!r}: "..."}}.'
        )
    if text_field not in record:
        keys = ", ".join(map(repr, list(record)[:8])) or "none"
        raise DataError(
            f"{where}: the record has no {text_field!r} key (its keys: {keys}). Set "
            "data.text_field to the key that holds the text."
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(
            f"{where}: {text_field!r} holds a {type(text).__name__}, not a string. Set "
            "data.text_field to the key that holds the text, or fix the record."
        )
    return text


def _read_jsonl(file: CorpusFile, text_field: str) -> Iterator[str]:
    try:
        with open(file.path, "rb") as fh:
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    yield _record_text(file, lineno, line, text_field)
    except OSError as exc:
        raise _unreadable(file, exc) from None


def read_documents(
    files: Iterable[CorpusFile], *, text_field: str = "text", max_bytes: int | None = None
) -> Iterator[tuple[CorpusFile, str]]:
    """Yield ``(file, document)`` in file order, stopping after ``max_bytes`` UTF-8 bytes.

    A text file is one document; a .jsonl file is one document per non-blank line. The document
    that crosses ``max_bytes`` is cut there, so the cap is exact and deterministic. Empty
    documents are skipped.

    Raises:
        DataError: a file is unreadable, not UTF-8, or (jsonl) has a bad line; the message names
            the file (and line) and the fix.
    """
    remaining = max_bytes
    for file in files:
        if remaining is not None and remaining <= 0:
            return
        docs = (
            _read_text(file, remaining) if file.format == "text" else _read_jsonl(file, text_field)
        )
        for text in docs:
            if not text:
                continue
            if remaining is not None:
                size = len(text.encode("utf-8"))
                if size > remaining:
                    # Cutting the bytes may split a character: drop that partial character.
                    text = text.encode("utf-8")[:remaining].decode("utf-8", errors="ignore")
                    size = remaining
                remaining -= size
            yield file, text
            if remaining is not None and remaining <= 0:
                return
