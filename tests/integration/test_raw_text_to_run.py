"""The whole data path through the command line, on real text: train a BPE tokenizer, prepare
shards with it, pre-train from them, and compare bits per byte with a byte-level run of the
same text (bpb counts bytes, so the two are in the same unit where their losses are not)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from apt.cli.main import main
from apt.model import APTLargeModel
from apt.trainops.data import python_stdlib_files

STEPS = "training.max_steps=60"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 standard-library modules as one .jsonl file (one record per module)."""
    folder = tmp_path_factory.mktemp("raw")
    lines = [
        json.dumps({"text": path.read_text(encoding="utf-8", errors="replace")})
        for path in python_stdlib_files()[:40]
    ]
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "corpus.jsonl"


def _val_records(run: Path) -> list[dict[str, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "val_bpb" in r]


def _prepare_and_train(tmp: Path, corpus: Path, tokenizer: str, name: str) -> Path:
    shards = tmp / f"shards-{name}"
    prepare = ["data", "prepare", "--input", str(corpus), "--output", str(shards)]
    assert main([*prepare, "--tokenizer", tokenizer, "--val-fraction", "0.1"]) == 0
    sets = [
        f"data.source.path={shards}",
        "model.vocab_size=auto",
        "eval.interval=30",
        STEPS,
        f"artifacts.output_dir={tmp}",
        f"artifacts.experiment_name={name}",
    ]
    args = ["train", "--profile", "cpu/pretrain_tiny"]
    assert main([*args, *[x for s in sets for x in ("--set", s)]]) == 0
    return tmp / name


def test_raw_text_to_a_bpe_run_and_its_bits_per_byte(corpus: Path, tmp_path: Path) -> None:
    tok_dir = tmp_path / "tok"
    tokenizer = ["data", "tokenizer", "--input", str(corpus), "--vocab-size", "768"]
    assert main([*tokenizer, "--output", str(tok_dir)]) == 0
    bpe_run = _prepare_and_train(tmp_path, corpus, str(tok_dir), "bpe")
    byte_run = _prepare_and_train(tmp_path, corpus, "byte", "byte")

    bpe, byte = _val_records(bpe_run), _val_records(byte_run)
    assert bpe[-1]["val_loss"] < bpe[0]["val_loss"]  # it learns from the shards
    # Same unit: after the same steps both are a few bits per byte, where the BPE's loss per
    # token is several times the byte model's (each BPE token covers several bytes).
    assert all(math.isfinite(r["val_bpb"]) for r in bpe + byte)
    assert 0.5 < bpe[-1]["val_bpb"] / byte[-1]["val_bpb"] < 2.0
    assert bpe[-1]["val_loss"] > 1.5 * byte[-1]["val_loss"]

    model = APTLargeModel.from_pretrained(bpe_run / "final_model")
    assert model.config.vocab_size == 768  # auto: 768 ids, a multiple of 64 already
    assert model.tokenizer is not None and model.tokenizer.name == "bpe"
    assert isinstance(model.generate("import ", max_new_tokens=4, temperature=0), str)
