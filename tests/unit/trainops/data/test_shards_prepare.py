"""``data prepare``: real standard-library text in .txt, .jsonl and .parquet files -> shards.

The expected token streams are computed here from the documented rules (documents in sorted
file order, each one's bytes and the end-of-text id; a document is in ``val`` when the first 8
bytes of sha256(relative path NUL position) are below ``val_fraction * 2**64``), not by the
code under test.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from apt.cli import data_cmd
from apt.core.errors import ConfigError, DataError
from apt.trainops.data.corpus import python_stdlib_files
from apt.trainops.data.shards import prepare as prepare_module
from apt.trainops.data.shards.index import read_index
from apt.trainops.data.shards.prepare import (
    DEFAULT_SHARD_TOKENS,
    DEFAULT_VAL_FRACTION,
    PROGRESS_FILE,
    prepare_shards,
    shard_dtype,
)
from apt.trainops.data.tokenizers import token_dtype

SHARD = 20_000  # tokens per shard in these tests: dozens of shards
VAL = 0.05


def _stdlib_texts(count: int, *, skip: int = 0) -> list[str]:
    return [p.read_text(errors="replace") for p in python_stdlib_files()[skip : skip + count]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``a/code.jsonl`` (60 files, one a line, a blank line and an empty text among them),
    ``b/*.txt`` (20 files), ``c/rows.parquet`` (30 files in two row groups, with pyarrow)."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "a").mkdir()
    (root / "b").mkdir()
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(_stdlib_texts(60))]
    lines[10:10] = ["", json.dumps({"text": ""})]
    (root / "a" / "code.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for i, text in enumerate(_stdlib_texts(20, skip=60)):
        (root / "b" / f"file{i:02d}.txt").write_text(text, encoding="utf-8")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return root
    (root / "c").mkdir()
    table = pa.table({"n": list(range(30)), "text": _stdlib_texts(30, skip=80)})
    pq.write_table(table, root / "c" / "rows.parquet", row_group_size=17)
    return root


def _inputs(corpus: Path) -> list[str]:
    found = [str(corpus / "a" / "*.jsonl"), str(corpus / "b" / "*.txt")]
    return found + ([str(corpus / "c" / "*.parquet")] if (corpus / "c").exists() else [])


def _documents(corpus: Path) -> list[tuple[str, int, str]]:
    """(relative path, position, text) of every non-empty document, in the documented order."""
    docs: list[tuple[str, int, str]] = []
    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    for path in sorted(files, key=lambda p: p.relative_to(corpus).as_posix()):
        rel = path.relative_to(corpus).as_posix()
        if path.suffix == ".txt":
            docs.append((rel, 0, path.read_text(encoding="utf-8")))
        elif path.suffix == ".jsonl":
            for pos, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    docs.append((rel, pos, json.loads(line)["text"]))
        else:
            import pyarrow.parquet as pq

            texts = pq.read_table(path).column("text").to_pylist()
            docs.extend((rel, pos, text) for pos, text in enumerate(texts))
    return [d for d in docs if d[2]]


def _expected(corpus: Path, val_fraction: float) -> dict[str, list[list[int]]]:
    """Each split's documents as token lists (byte tokenizer: the bytes, then eos 0)."""
    splits: dict[str, list[list[int]]] = {"train": [], "val": []}
    for rel, pos, text in _documents(corpus):
        digest = hashlib.sha256(f"{rel}\0{pos}".encode()).digest()
        val = int.from_bytes(digest[:8], "big") < val_fraction * 2.0**64
        splits["val" if val else "train"].append([*text.encode("utf-8"), 0])
    return splits


def _stream(folder: Path, split: str) -> np.ndarray:
    index = read_index(folder)
    parts = [np.fromfile(folder / s.file, dtype=index.dtype) for s in index.splits[split].shards]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=index.dtype)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "shards"
    prepare_shards(
        _inputs(corpus), out, tokenizer_spec="byte", shard_tokens=SHARD, val_fraction=VAL
    )
    return out


def test_the_stream_is_every_document_then_eos_in_order(corpus: Path, reference: Path) -> None:
    expected = _expected(corpus, VAL)
    index = read_index(reference)
    assert set(index.splits) == {"train", "val"}
    assert len(expected["val"]) >= 3 and len(index.splits["train"].shards) > 10
    for split, docs in expected.items():
        info = index.splits[split]
        stream = _stream(reference, split)
        assert stream.tolist() == [t for doc in docs for t in doc]
        assert info.tokens == len(stream) and info.documents == len(docs)
        assert [s.tokens for s in info.shards[:-1]] == [SHARD] * (len(info.shards) - 1)
        assert 0 < info.shards[-1].tokens <= SHARD
        for shard in info.shards:
            digest = hashlib.sha256((reference / shard.file).read_bytes()).hexdigest()
            assert shard.sha256 == digest
        starts = np.load(reference / info.docs_file)
        assert starts.dtype == np.int64
        assert starts.tolist() == np.cumsum([0] + [len(d) for d in docs[:-1]]).tolist()
    documents = {Path(i.path).name: i.documents for i in index.inputs}
    assert documents["code.jsonl"] == 60  # the blank line and the empty text are no documents
    assert documents["file00.txt"] == 1
    assert sorted(p.name for p in reference.iterdir() if p.name.startswith(".")) == []
    assert not (reference / PROGRESS_FILE).exists()
    assert index.tokenizer.spec == {"kind": "byte"} and index.tokenizer.vocab_size == 256


def test_two_workers_write_the_same_bytes(corpus: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "two"
    prepare_shards(
        _inputs(corpus),
        out,
        tokenizer_spec={"kind": "byte"},
        workers=2,
        shard_tokens=SHARD,
        val_fraction=VAL,
    )
    assert _files(out) == _files(reference)


def test_shard_dtypes_are_uint16_or_uint32(corpus: Path, reference: Path) -> None:
    assert token_dtype(256) == np.uint8  # in memory; shards never use uint8
    assert shard_dtype(256) == np.uint16 and shard_dtype(1 << 16) == np.uint16
    assert shard_dtype((1 << 16) + 1) == np.uint32
    index = read_index(reference)
    first = index.splits["train"].shards[0]
    assert index.dtype == "uint16"
    assert (reference / first.file).stat().st_size == 2 * first.tokens


BIG_TOKENIZER = '''
import numpy as np


class Big:
    """Byte ids moved past 65536: a vocabulary that needs uint32."""

    name = "big"
    vocab_size = 70_000
    eos_id = 69_999

    def encode(self, text):
        return [b + 65_600 for b in text.encode()]

    def encode_array(self, text):
        return np.frombuffer(text.encode(), np.uint8).astype(np.uint32) + 65_600

    def decode(self, ids):
        return bytes(i - 65_600 for i in ids).decode(errors="replace")
'''


@pytest.fixture
def big_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    (tmp_path / "big_tokenizer.py").write_text(BIG_TOKENIZER)
    monkeypatch.syspath_prepend(str(tmp_path))
    return {"kind": "big_tokenizer:Big"}


def test_a_vocabulary_over_65536_gets_uint32(
    corpus: Path, tmp_path: Path, big_tokenizer: dict[str, str]
) -> None:
    out = tmp_path / "big"
    inputs = [str(corpus / "b" / "file0*.txt")]
    index = prepare_shards(inputs, out, tokenizer_spec=big_tokenizer, val_fraction=0)
    assert index.dtype == "uint32" and set(index.splits) == {"train"}
    texts = [(corpus / "b" / f"file0{i}.txt").read_bytes() for i in range(10)]
    expected = [t for text in texts for t in [*(b + 65_600 for b in text), 69_999]]
    assert _stream(out, "train").tolist() == expected


def test_a_finished_folder_run_again_is_left_alone(
    corpus: Path, reference: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in reference.iterdir()}
    with caplog.at_level(logging.INFO, logger="apt"):
        index = prepare_shards(
            _inputs(corpus), reference, tokenizer_spec="byte", shard_tokens=SHARD, val_fraction=VAL
        )
    assert "already prepared" in caplog.text
    assert index == read_index(reference)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in reference.iterdir()} == before


def test_other_inputs_or_options_are_refused(corpus: Path, reference: Path) -> None:
    common: dict[str, Any] = {"shard_tokens": SHARD, "val_fraction": VAL}
    with pytest.raises(DataError, match=r"they differ in: inputs\).*new --output folder"):
        prepare_shards(_inputs(corpus)[:1], reference, tokenizer_spec="byte", **common)
    with pytest.raises(DataError, match=r"differ in: .*shard_tokens.*delete"):
        prepare_shards(
            _inputs(corpus), reference, tokenizer_spec="byte", shard_tokens=7, val_fraction=VAL
        )


class _Interrupt(Exception):
    """Stands for a kill at a progress record."""


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """Make the ``call``-th progress record raise instead of being written (shards that
    finished just before it are renamed but not recorded)."""
    real = prepare_module._write_progress
    calls = []

    def write(folder: Path, record: dict[str, Any]) -> None:
        calls.append(1)
        if len(calls) == call:
            raise _Interrupt
        real(folder, record)

    monkeypatch.setattr(prepare_module, "_write_progress", write)


@pytest.mark.parametrize("call", [2, 3])
def test_an_interrupted_run_is_completed_to_the_same_bytes(
    corpus: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: int
) -> None:
    out = tmp_path / "out"
    args: dict[str, Any] = {"tokenizer_spec": "byte", "shard_tokens": SHARD, "val_fraction": VAL}
    _interrupt_at(monkeypatch, call)
    with pytest.raises(_Interrupt):
        prepare_shards(_inputs(corpus), out, **args)
    assert not (out / "index.json").exists() and (out / "train-00000.bin").exists()
    monkeypatch.undo()
    prepare_shards(_inputs(corpus), out, **args)
    assert _files(out) == _files(reference)


def test_an_unfinished_folder_refuses_another_tokenizer(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, big_tokenizer: dict[str, str]
) -> None:
    out = tmp_path / "out"
    _interrupt_at(monkeypatch, 3)
    with pytest.raises(_Interrupt):
        prepare_shards(_inputs(corpus), out, tokenizer_spec="byte", shard_tokens=SHARD)
    with pytest.raises(DataError, match=r"unfinished preparation.*differ in: dtype, tokenizer"):
        prepare_shards(_inputs(corpus), out, tokenizer_spec=big_tokenizer, shard_tokens=SHARD)


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """About 8 MB of the standard library in one .jsonl file, and its shards (reference)."""
    root = tmp_path_factory.mktemp("big")
    texts, size = [], 0
    for path in python_stdlib_files():
        texts.append(json.dumps({"text": path.read_text(errors="replace")}))
        size += len(texts[-1])
        if size > 8_000_000:
            break
    (root / "stdlib.jsonl").write_text("\n".join(texts) + "\n")
    prepare_shards([str(root / "stdlib.jsonl")], root / "ref", tokenizer_spec="byte",
                   shard_tokens=8192, val_fraction=VAL)  # fmt: skip
    return root / "stdlib.jsonl", root / "ref"


def _prepare_cli(source: Path, out: Path, workers: int) -> list[str]:
    return [
        *(sys.executable, "-m", "apt", "data", "prepare", "--input", str(source)),
        *("--output", str(out), "--shard-tokens", "8192", "--val-fraction", str(VAL)),
        *("--workers", str(workers), "--no-progress"),
    ]


@pytest.mark.parametrize("wait_for, workers", [("train-00000.bin", 2), ("train-00300.bin", 1)])
def test_a_killed_prepare_run_again_gives_the_same_bytes(
    big_corpus: tuple[Path, Path], tmp_path: Path, wait_for: str, workers: int
) -> None:
    """SIGKILL a real run once ``wait_for`` exists; the same command (with 1 worker) then
    completes the folder to the bytes of an uninterrupted run."""
    source, ref = big_corpus
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _prepare_cli(source, out, workers=workers), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while not (out / wait_for).exists():
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, f"{wait_for} never appeared"
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "index.json").exists() and (out / PROGRESS_FILE).exists()
    again = subprocess.run(
        _prepare_cli(source, out, workers=1), capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    assert _files(out) == _files(ref)


def _write(path: Path, content: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("bad.jsonl", '{"text": "a"}\n\n{"text": "b",\n', r"bad\.jsonl:3: not valid JSON.*fix or"),
        (
            "nokey.jsonl",
            '{"text": "a"}\n{"body": "b"}\n',
            r"nokey\.jsonl:2: the record has no 'text' key \(its keys: 'body'\)\. Set "
            r"--text-field \(text_field=\)",
        ),
        ("list.jsonl", "[1, 2]\n", r"list\.jsonl:1: expected a JSON object with a 'text' key"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), r"latin1\.txt is not valid UTF-8.*iconv"),
        ("notes.md", "text", r"notes\.md has an unsupported type '\.md'.*\.parquet"),
    ],
)
def test_bad_records_name_the_file_line_and_fix(
    tmp_path: Path, name: str, content: str | bytes, expected: str
) -> None:
    path = _write(tmp_path / "in" / name, content)
    with pytest.raises(DataError, match=expected):
        prepare_shards([path], tmp_path / "out", tokenizer_spec="byte")


def test_bad_paths_and_folders(tmp_path: Path) -> None:
    good = _write(tmp_path / "in" / "a.txt", "hello")
    with pytest.raises(DataError, match=r"--input: no file matches '.*missing/\*\.txt'"):
        prepare_shards([str(tmp_path / "missing/*.txt")], tmp_path / "o1", tokenizer_spec="byte")
    output = Path(_write(tmp_path / "taken", "x"))
    with pytest.raises(DataError, match=r"--output .*taken is a file\. Give a folder"):
        prepare_shards([good], output, tokenizer_spec="byte")
    _write(tmp_path / "busy" / "mine.txt", "x")
    with pytest.raises(DataError, match=r"busy is not empty and holds no preparation"):
        prepare_shards([good], tmp_path / "busy", tokenizer_spec="byte")
    with pytest.raises(ConfigError, match=r"--val-fraction \(val_fraction\) must be in \[0, 1\)"):
        prepare_shards([good], tmp_path / "o2", tokenizer_spec="byte", val_fraction=1.0)


def test_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.txt"
    if os.geteuid() == 0:  # root reads any file: a /proc file that fails with EIO instead
        path.symlink_to("/proc/self/mem")
    else:
        path.write_text("hidden")
        path.chmod(0)
    with pytest.raises(DataError, match=r"cannot read .*secret\.txt: .*Check that it exists"):
        prepare_shards([str(path)], tmp_path / "out", tokenizer_spec="byte")


def test_a_stopped_run_that_finished_no_shard_starts_over(tmp_path: Path) -> None:
    bad = _write(tmp_path / "in" / "a.jsonl", '{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2"):
        prepare_shards([bad], tmp_path / "out", tokenizer_spec="byte")
    good = _write(tmp_path / "in" / "b.jsonl", '{"text": "one"}\n')
    index = prepare_shards([good], tmp_path / "out", tokenizer_spec="byte", val_fraction=0)
    assert index.splits["train"].tokens == 4


def test_parquet_column_and_null_errors(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), path)
    with pytest.raises(DataError, match=r"rows\.parquet: no 'text' column \(its columns: 'body'\)"):
        prepare_shards([str(path)], tmp_path / "o1", tokenizer_spec="byte")
    index = prepare_shards(
        [str(path)], tmp_path / "o2", tokenizer_spec="byte", text_field="body", val_fraction=0
    )
    assert _stream(tmp_path / "o2", "train").tolist() == [97, 0, 98, 0]
    assert index.inputs[0].documents == 2
    pq.write_table(pa.table({"text": ["a", None]}), path)
    with pytest.raises(DataError, match=r"rows\.parquet: row 1: 'text' is null"):
        prepare_shards([str(path)], tmp_path / "o3", tokenizer_spec="byte")
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(DataError, match=r"column 'text' holds int64, not text"):
        prepare_shards([str(path)], tmp_path / "o4", tokenizer_spec="byte")


def test_parquet_without_pyarrow_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path / "rows.parquet", b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"rows\.parquet is a Parquet file.*pip install pyarrow"):
        prepare_shards([path], tmp_path / "out", tokenizer_spec="byte")


def test_the_cli_exits_2_with_the_message(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.jsonl", '{"text": "a"}\n{oops\n')
    proc = subprocess.run(
        [sys.executable, "-m", "apt", "data", "prepare", "--input", bad, "--output",
         str(tmp_path / "out"), "--workers", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"{bad}:2: not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "apt", "data", "prepare", "--input", "nothing/*.txt",
         "--output", "out", "--tokenizer", "no_such_tokenizer.json"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "--tokenizer 'no_such_tokenizer.json': neither a tokenizer name" in missing.stderr


def test_the_cli_defaults_and_tokenizer_specs(tmp_path: Path) -> None:
    assert data_cmd._SHARD_TOKENS == DEFAULT_SHARD_TOKENS
    assert data_cmd._VAL_FRACTION == DEFAULT_VAL_FRACTION
    assert data_cmd.tokenizer_spec("byte") == {"kind": "byte"}
    (tmp_path / "tok").mkdir()
    assert data_cmd.tokenizer_spec(str(tmp_path / "tok")) == {
        "kind": "bpe",
        "path": str((tmp_path / "tok").resolve()),
    }
    probe = (
        "import sys; from apt.cli.main import _parser; _parser()\n"
        "assert 'torch' not in sys.modules, 'building the parser imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
