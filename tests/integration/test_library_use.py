"""APT used from Python, as a script would: what it prints, where it writes, what it warns of."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from apt import load_profile
from apt.trainops.engine import Trainer

TINY = ["training.max_steps=4", "data.max_corpus_bytes=8000", "eval.max_batches=1"]


def _script(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "script.py").write_text(textwrap.dedent(body), encoding="utf-8")
    return subprocess.run(
        [sys.executable, "script.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_a_script_shows_the_same_messages_as_the_cli(tmp_path: Path) -> None:
    proc = _script(
        tmp_path,
        f"""
        from apt import Trainer, load_profile

        config = load_profile("cpu/tiny", overrides={TINY!r})
        Trainer.from_config(config).train()
        shorter = load_profile("cpu/tiny", overrides={TINY!r} + ["training.max_steps=3"])
        Trainer.from_config(shorter).train()
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint step-000000004 saved" in proc.stderr
    assert "training.max_steps: 4 -> 3" in proc.stderr  # the allowed change, said
    assert "run already complete at step 4" in proc.stderr


def test_an_application_that_logs_gets_each_line_once_and_can_silence_them(
    tmp_path: Path,
) -> None:
    proc = _script(
        tmp_path,
        f"""
        import logging
        logging.basicConfig(level=logging.INFO, format="app| %(name)s: %(message)s")
        from apt import Trainer, load_profile

        Trainer.from_config(load_profile("cpu/tiny", overrides={TINY!r})).train()
        logging.getLogger("apt").setLevel(logging.WARNING)
        quiet = {TINY!r} + ["artifacts.experiment_name=quiet"]
        Trainer.from_config(load_profile("cpu/tiny", overrides=quiet)).train()
        """,
    )
    assert proc.returncode == 0, proc.stderr
    saved = [line for line in proc.stderr.splitlines() if "step-000000004 saved" in line]
    assert len(saved) == 1 and saved[0].startswith("app| apt"), proc.stderr  # through the app's
    assert "runs/quiet" not in proc.stderr  # silenced


def test_a_relative_checkpoint_dir_is_relative_to_the_working_directory(in_tmp: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(32, 8), torch.nn.Linear(8, 32))
    data = [{"input_ids": torch.randint(0, 32, (9,))} for _ in range(64)]
    Trainer(model=model, train_dataset=data, max_steps=2, checkpoint_dir="ckpt/").train()
    assert (in_tmp / "ckpt" / "LATEST").read_text().strip() == "step-000000002"
    assert not (in_tmp / "runs" / "default" / "ckpt").exists()


def test_the_exported_model_is_readable_under_the_users_umask(in_tmp: Path) -> None:
    old = os.umask(0o022)
    try:
        result = Trainer.from_config(load_profile("cpu/tiny", overrides=TINY)).train()
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        mode = stat.S_IMODE((result.run_dir / "final_model" / name).stat().st_mode)
        assert mode == 0o644, f"{name}: {oct(mode)}"


def test_the_thread_count_is_recorded_and_a_different_one_is_warned_of(
    in_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = Trainer.from_config(
        load_profile("cpu/tiny", overrides=[*TINY, "training.cpu_threads=1"])
    )
    assert torch.get_num_threads() == 1
    first.train()
    longer = [*TINY, "training.max_steps=6", "training.cpu_threads=2"]
    with caplog.at_level("WARNING", logger="apt"):
        Trainer.from_config(load_profile("cpu/tiny", overrides=longer)).train()
    assert "resuming with 2 CPU threads; the checkpoint was written with 1" in caplog.text


def test_a_gpu_profile_on_the_cpu_is_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    from apt.trainops.engine.preflight import warn_if_made_for_gpus

    cfg = load_profile("standard").training
    with caplog.at_level("WARNING", logger="apt"):
        warn_if_made_for_gpus(cfg, torch.nn.Linear(8000, 8000), torch.device("cpu"))
    assert "set up for GPUs (precision bf16, torch.compile, 64M parameters)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="apt"):
        warn_if_made_for_gpus(
            load_profile("quickstart").training, torch.nn.Linear(8, 8), torch.device("cpu")
        )
    assert caplog.text == ""


def test_new_run_says_where_the_old_run_went(
    in_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Trainer.from_config(load_profile("cpu/tiny", overrides=TINY)).train()
    with caplog.at_level("INFO", logger="apt"):
        Trainer.from_config(load_profile("cpu/tiny", overrides=TINY), new_run=True)
    moved = [p for p in (in_tmp / "runs").iterdir() if p.name.startswith("tiny-")]
    assert (
        len(moved) == 1 and f"moved the previous run folder to runs/{moved[0].name}" in caplog.text
    )
