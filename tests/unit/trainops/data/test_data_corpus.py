"""Corpus discovery and reading: the real standard library, real .txt/.jsonl files, bad input."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from apt.core.errors import DataError
from apt.trainops.data import python_stdlib_files, read_documents, resolve_files


def test_python_stdlib_files_are_the_real_stdlib() -> None:
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = python_stdlib_files()
    rels = [p.relative_to(root).as_posix() for p in files]
    assert len(files) > 500
    assert all(p.suffix == ".py" and p.is_file() for p in files)
    assert rels == sorted(rels)
    assert not any({"site-packages", "dist-packages"} & set(p.parts) for p in files)
    assert "os.py" in rels and "json/__init__.py" in rels
    assert python_stdlib_files() == files


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_txt_and_jsonl_globs(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", "alpha")
    _write(tmp_path / "deep" / "b.txt", "beta é")
    _write(tmp_path / "c.jsonl", '{"body": "one"}\n\n{"body": "two", "id": 2}\n')
    _write(tmp_path / "skip.md", "not matched")
    files = resolve_files(
        [str(tmp_path / "**" / "*.txt"), str(tmp_path / "*.jsonl"), str(tmp_path / "a.txt")],
        key="data.train_files",
    )
    assert [f.rel for f in files] == ["a.txt", "c.jsonl", "deep/b.txt"]  # sorted, de-duplicated
    assert [f.format for f in files] == ["text", "jsonl", "text"]
    docs = [text for _, text in read_documents(files, text_field="body")]
    assert docs == ["alpha", "one", "two", "beta é"]


def test_byte_cap_is_exact_and_in_order(tmp_path: Path) -> None:
    _write(tmp_path / "1.txt", "aaaa")
    _write(tmp_path / "2.jsonl", json.dumps({"text": "bbbb"}) + "\n" + json.dumps({"text": "cc"}))
    _write(tmp_path / "3.txt", "é" * 10)  # 2 bytes a character
    files = resolve_files([str(tmp_path / "*")], key="k")
    assert [t for _, t in read_documents(files, max_bytes=6)] == ["aaaa", "bb"]
    assert [t for _, t in read_documents(files, max_bytes=10)] == ["aaaa", "bbbb", "cc"]
    # A cap inside a multi-byte character drops the partial character.
    assert [t for _, t in read_documents(files, max_bytes=13)] == ["aaaa", "bbbb", "cc", "é"]


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("missing/*.txt", r"data\.train_files: no file matches 'missing/\*\.txt'.*Fix the pattern"),
        ("nope.txt", r"data\.train_files: file 'nope\.txt' does not exist.*Fix the path"),
        ("folder", r"data\.train_files: 'folder' is a folder.*'folder/\*\.txt'"),
        ("table.csv", r"table\.csv has an unsupported type '\.csv'.*\.txt.*\.jsonl"),
    ],
)
def test_bad_file_lists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pattern: str, message: str
) -> None:
    (tmp_path / "folder").mkdir()
    _write(tmp_path / "table.csv", "a,b\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=message):
        resolve_files([pattern], key="data.train_files")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b'{"text": "ok"}\n{"text": "unterminated\n',
            r"bad\.jsonl:2: not valid JSON.*fix or delete",
        ),
        (b'{"text": "ok"}\n\n["a list"]\n', r"bad\.jsonl:3: expected a JSON object with a 'text'"),
        (
            b'{"body": "x", "id": 1}\n',
            r"bad\.jsonl:1: the record has no 'text' key \(its keys: "
            r"'body', 'id'\)\. Set data\.text_field",
        ),
        (b'{"text": 42}\n', r"bad\.jsonl:1: 'text' holds a int, not a string"),
    ],
)
def test_bad_jsonl(tmp_path: Path, content: bytes, message: str) -> None:
    files = resolve_files([str(_write(tmp_path / "bad.jsonl", content))], key="k")
    with pytest.raises(DataError, match=message):
        list(read_documents(files))


def test_not_utf8_names_the_file_and_fix(tmp_path: Path) -> None:
    files = resolve_files([str(_write(tmp_path / "latin.txt", "café".encode("latin-1")))], key="k")
    with pytest.raises(DataError, match=r"latin\.txt is not valid UTF-8 \(byte 3.*iconv"):
        list(read_documents(files))


def test_file_gone_before_reading(tmp_path: Path) -> None:
    path = _write(tmp_path / "vanishing.txt", "x")
    files = resolve_files([str(path)], key="k")
    path.unlink()
    with pytest.raises(DataError, match=r"cannot read .*vanishing\.txt.*readable"):
        list(read_documents(files))
