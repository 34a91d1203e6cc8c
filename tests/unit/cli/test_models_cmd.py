"""``export RUN_DIR --name NAME`` and ``models list|show|remove``: a tiny trained run into the
local model store (``APT_HOME``), back out by name, and bad input answered with exit code 2."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from apt.cli.main import main
from apt.model import APTLargeModel, APTModel

Cli = Callable[..., tuple[int, str, str]]
IDS = torch.tensor([list(b"import os\nimport sys\n")])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from apt.core.config import load_profile
    from apt.trainops.engine import Trainer

    root = tmp_path_factory.mktemp("runs")
    overrides = ["training.max_steps=4", f"artifacts.output_dir={root}"]
    Trainer.from_config(load_profile("cpu/tiny", overrides=overrides)).train()
    return root / "tiny"


@pytest.fixture
def cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Cli]:
    """``python -m apt ...`` in this process, with ``APT_HOME=<tmp>/store``: (code, out, err)."""
    monkeypatch.setenv("APT_HOME", str(tmp_path / "store"))
    logger = logging.getLogger("apt")
    saved = (logger.level, list(logger.handlers), logger.propagate)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    yield run
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


def _logits(model: APTModel) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def _last(run_dir: Path, key: str) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if key in r][-1]


def test_export_list_show_load_remove(run_dir: Path, cli: Cli, tmp_path: Path) -> None:
    code, out, _ = cli("export", str(run_dir), "--name", "tiny-code")
    assert code == 0 and "'tiny-code' (step 4) in the local model store" in out
    final = APTModel.from_pretrained(run_dir / "final_model")
    val_loss = _last(run_dir, "val_loss")

    code, out, _ = cli("models", "list")
    header, row = out.splitlines()[1:]
    assert code == 0 and out.splitlines()[0] == f"local model store: {tmp_path / 'store'}"
    assert header.split() == ["NAME", "PARAMETERS", "STEPS", "FINAL", "LOSS", "SIZE", "DATE"]
    cells = row.split()
    assert cells[:4] == ["tiny-code", f"{final.num_parameters():,}", "4", f"{val_loss:.4f}"]
    assert cells[5] == "KiB"

    code, out, _ = cli("models", "show", "tiny-code")
    assert code == 0 and "# tiny-code" in out
    assert "| steps | 4 |" in out and f"| val_loss | {val_loss:.4f} |" in out
    assert "| data | python_stdlib (first 60,000 bytes) |" in out
    assert f"| run | {run_dir.absolute()} |" in out
    code, out, _ = cli("models", "show", "tiny-code", "--json")
    card = json.loads(out)
    assert card["steps"] == 4 and card["tokenizer"] == "byte"
    assert card["final_metrics"]["val_loss"] == val_loss
    assert card["final_metrics"]["train_loss"] == _last(run_dir, "train_loss")
    assert "tokens_per_second" not in card["final_metrics"]

    loaded = APTLargeModel.from_pretrained("tiny-code")  # through $APT_HOME
    assert torch.equal(_logits(loaded), _logits(final))
    assert loaded.tokenizer is not None and loaded.tokenizer.name == "byte"

    code, _, err = cli("export", str(run_dir), "--name", "tiny-code")
    assert code == 2 and "holds 'tiny-code' already" in err and "--force" in err
    assert cli("export", str(run_dir / "final_model"), "--name", "tiny-code", "--force")[0] == 0

    code, out, _ = cli("models", "remove", "tiny-code", "--yes")
    assert code == 0 and out.startswith("removed tiny-code (")
    assert list((tmp_path / "store").iterdir()) == []
    code, out, _ = cli("models", "list")
    assert code == 0 and "is empty" in out and "export RUN_DIR --name NAME" in out


def test_a_run_without_final_model_exports_its_newest_checkpoint(
    run_dir: Path, cli: Cli, tmp_path: Path
) -> None:
    run = tmp_path / "unfinished"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("final_model"))
    code, out, _ = cli("export", str(run), "--name", "from-ckpt")
    assert code == 0 and "step-000000004" in out
    card = json.loads(cli("models", "show", "from-ckpt", "--json")[1])
    assert card["steps"] == 4 and card["checkpoint"].endswith("checkpoints/step-000000004")
    assert card["run"] == str(run.absolute())
    final = APTModel.from_pretrained(run_dir / "final_model")  # the weights of step 4 too
    assert torch.equal(_logits(APTLargeModel.from_pretrained("from-ckpt")), _logits(final))


def test_bad_input_exits_2_with_one_line(run_dir: Path, cli: Cli, tmp_path: Path) -> None:
    cases = [
        (("models", "show", "nope"), "no model named 'nope'"),
        (("models", "show", "../x"), "is not a model name"),
        (("models", "remove", "nope", "--yes"), "(it is empty)"),
        (("export", str(run_dir), "--name", "a/b"), "is not a model name"),
        (("export", str(run_dir), "--name", "x", "--format", "hf"), "drop --format hf"),
        (("export", str(run_dir), "-o", str(tmp_path / "o"), "--force"), "--force goes with"),
        (("export", str(tmp_path / "none"), "--name", "x"), "no such folder"),
    ]
    for argv, expected in cases:
        code, out, err = cli(*argv)
        assert (code, out) == (2, ""), argv
        assert len(err.strip().splitlines()) == 1 and expected in err, (argv, err)
    assert not (tmp_path / "store").exists()  # nothing was written

    assert cli("export", str(run_dir), "--name", "kept")[0] == 0
    code, _, err = cli("models", "remove", "kept")  # no terminal to ask on: refused
    assert code == 2 and "pass --yes" in err
    assert cli("models", "show", "kept")[0] == 0


def test_the_command_line_reads_apt_home(run_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "APT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}

    def apt(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "apt", *argv],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert apt("export", str(run_dir), "--name", "tiny").returncode == 0
    assert (tmp_path / "home" / "tiny" / "MODEL_CARD.md").is_file()
    missing = apt("models", "show", "nope")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "(it holds: tiny)" in missing.stderr
