"""``python -m apt eval`` on a real tiny run: the numbers equal the in-process Evaluator's, the
JSON lands where it should, and unusable input exits 2 with one line naming the path."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from apt import load_profile
from apt.cli.eval_cmd import METRIC_NAMES
from apt.core.config import config_from_dict
from apt.model import APTModel
from apt.trainops.checkpoints.dcp import read_dcp_tensors
from apt.trainops.data import ByteTokenizer, PackedDataset, tokenize_documents
from apt.trainops.engine import Trainer
from apt.trainops.eval import METRICS, Evaluator, token_byte_lengths

FINAL, OLDER = "step-000000004", "step-000000002"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints_v1"
FSDP_STEP = FIXTURES / "run_fsdp" / "checkpoints" / OLDER  # two ranks' DCP shards
TEXT_A = "def add(a, b):\n    return a + b\n\n" * 30
TEXT_B = "Évaluer un modèle coûte peu: un passage avant, sans gradient.\n" * 12


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A four-step cpu/tiny run: checkpoints of steps 2 and 4, and final_model (the weights of
    step 4)."""
    out = tmp_path_factory.mktemp("runs")
    config = load_profile(
        "cpu/tiny",
        overrides=[
            "training.max_steps=4",
            "training.checkpoints.save_interval=2",
            "data.max_corpus_bytes=8000",
            "eval.max_batches=1",
            f"artifacts.output_dir={out}",
        ],
    )
    result = Trainer.from_config(config).train()
    assert (result.run_dir / "checkpoints" / OLDER).is_dir()
    return Path(result.run_dir)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "text"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(TEXT_A, encoding="utf-8")
    (folder / "sub" / "b.txt").write_text(TEXT_B, encoding="utf-8")
    (folder / "notes.md").write_text("not read: only .txt and .jsonl files are", encoding="utf-8")
    return folder


def apt_eval(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apt", "eval", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def in_process(model_dir: Path, texts: list[str], names: tuple[str, ...], **kw: Any) -> dict:
    """What the Evaluator says in this process about ``texts``, packed as eval packs them."""
    tokens, _ = tokenize_documents(texts, ByteTokenizer())
    model = APTModel.from_pretrained(model_dir)
    dataset = PackedDataset(tokens, kw.pop("seq_len", model.config.max_seq_len))
    table = token_byte_lengths(ByteTokenizer())
    got = Evaluator(model=model, eval_dataset=dataset, metrics=names, token_bytes=table, **kw)
    result = got.evaluate()
    assert result
    return result


def test_the_cli_knows_every_metric() -> None:
    assert METRIC_NAMES == METRICS


def test_a_model_folder_scores_as_the_evaluator_does(run: Path, tmp_path: Path) -> None:
    text = tmp_path / "one.txt"
    text.write_text(TEXT_A + TEXT_B, encoding="utf-8")
    model = run / "final_model"
    proc = apt_eval("--model", str(model), "--data", str(text), "--batch-size", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((model / "eval.json").read_text())  # the default: next to the model
    assert list(report["metrics"]) == list(METRICS)
    assert report["step"] is None and report["seq_len"] == 32 and report["tokenizer"] == "byte"
    want = in_process(model, [TEXT_A + TEXT_B], METRICS, batch_size=4)
    assert report["metrics"] == pytest.approx(want, rel=1e-6, abs=1e-6)
    got = report["metrics"]
    assert got["bpb"] == pytest.approx(got["loss"] / math.log(2), rel=1e-12)  # one byte a token
    table = proc.stdout.splitlines()
    assert table[1].split() == ["metric", "value"]
    assert table[2].split() == ["loss", f"{got['loss']:.6f}"]
    assert table[-1] == f"metrics written to {model / 'eval.json'}"


def test_checkpoints_score_as_the_model_they_hold(run: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports" / "ckpt.json"
    args = [
        "--data",
        str(data),
        "--metrics",
        "bpb",
        "loss",
        "--seq-len",
        "16",
        "--max-batches",
        "3",
    ]
    proc = apt_eval("--checkpoint", str(run / "checkpoints"), *args, "--json", str(out), cwd=data)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["step"] == 4 and report["checkpoint"] == str(
        (run / "checkpoints" / FINAL).resolve()
    )
    assert list(report["metrics"]) == ["bpb", "loss"]
    # The final checkpoint and final_model hold the same weights; the folder's text files are
    # read in path order (a.txt, sub/b.txt) and notes.md is not read.
    want = in_process(
        run / "final_model", [TEXT_A, TEXT_B], ("bpb", "loss"), seq_len=16, max_batches=3
    )
    assert report["metrics"] == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert report["text_bytes"] == len((TEXT_A + TEXT_B).encode("utf-8"))

    step = apt_eval("--checkpoint", str(run / "checkpoints" / FINAL), *args, cwd=data)
    assert step.returncode == 0, step.stderr
    default = json.loads((run / "eval.json").read_text())  # the run folder's
    assert default["metrics"] == report["metrics"]


def test_a_sharded_checkpoint_is_read_in_one_process(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text(TEXT_B, encoding="utf-8")
    out = tmp_path / "fsdp.json"
    proc = apt_eval(
        "--checkpoint", str(FSDP_STEP), "--data", str(text), "--json", str(out), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    # The reference reads the two ranks' DCP shards another way: whole tensors, by name.
    saved = json.loads((FSDP_STEP / "trainer_state.json").read_text())["config"]
    model = APTModel(config_from_dict(saved).model)
    model.load_state_dict(read_dcp_tensors(FSDP_STEP / "model"))
    tokens, _ = tokenize_documents([TEXT_B], ByteTokenizer())
    dataset = PackedDataset(tokens, model.config.max_seq_len)
    table = token_byte_lengths(ByteTokenizer())
    torch.manual_seed(0)
    want = Evaluator(model=model, eval_dataset=dataset, token_bytes=table).evaluate()
    assert want is not None
    assert json.loads(out.read_text())["metrics"] == pytest.approx(
        {k: want[k] for k in METRICS}, rel=1e-6, abs=1e-6
    )


def _corrupt_copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy" / FINAL
    shutil.copytree(run / "checkpoints" / FINAL, copy)
    weights = copy / "model" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    return copy


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(
    run: Path, tmp_path: Path
) -> None:
    copy = _corrupt_copy(run, tmp_path).parent  # checkpoints: a good step 2, a corrupt step 4
    shutil.copytree(run / "checkpoints" / OLDER, copy / OLDER)
    text = tmp_path / "t.txt"
    text.write_text(TEXT_A, encoding="utf-8")
    out = tmp_path / "older.json"
    proc = apt_eval(
        "--checkpoint", str(copy), "--data", str(text), "--json", str(out), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "skipped newer checkpoint(s) that do not verify: step-000000004" in proc.stderr
    assert json.loads(out.read_text())["step"] == 2
    assert sorted(p.name for p in copy.iterdir()) == [OLDER, FINAL]  # nothing moved aside


@pytest.mark.parametrize(
    "case",
    ["no model folder", "checkpoints as --model", "corrupt checkpoint", "empty file", "no text"],
)
def test_unusable_input_exits_2_with_one_line(run: Path, tmp_path: Path, case: str) -> None:
    text = tmp_path / "t.txt"
    text.write_text(TEXT_A, encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "bare").mkdir()
    args, expected = {
        "no model folder": (
            ["--model", str(tmp_path / "nope"), "--data", str(text)],
            f"error: --model {tmp_path / 'nope'}: no such folder",
        ),
        "checkpoints as --model": (
            ["--model", str(run / "checkpoints"), "--data", str(text)],
            "not a model folder (no config.json)",
        ),
        "corrupt checkpoint": (
            ["--checkpoint", str(_corrupt_copy(run, tmp_path)), "--data", str(text)],
            f"{tmp_path / 'copy' / FINAL / 'model' / 'model.safetensors'}: expected sha256",
        ),
        "empty file": (
            ["--model", str(run / "final_model"), "--data", str(tmp_path / "empty.txt")],
            "holds no text (empty)",
        ),
        "no text": (
            ["--model", str(run / "final_model"), "--data", str(tmp_path / "bare")],
            f"--data {tmp_path / 'bare'}: the folder holds no .txt or .jsonl file",
        ),
    }[case]
    proc = apt_eval(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr


def test_a_misspelled_metric_is_a_config_error(run: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text(TEXT_A, encoding="utf-8")
    proc = apt_eval(
        "--model", str(run / "final_model"), "--data", str(text), "--metrics", "los", cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "config error: --metrics: unknown metric 'los'. Did you mean 'loss'? Valid metrics: "
        "loss, perplexity, accuracy, entropy, bpb"
    )
