"""Hostile input through the command line: exit code 2, a message naming the file or key, no
traceback, and nothing echoed that must not be (file contents, passwords)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

SECRET = "hunter2secret"


def apt(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apt", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def refused(proc: subprocess.CompletedProcess[str], *expected: str) -> str:
    """stderr of a run that ended with a config error (exit 2) and no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("config error: ")
    for text in expected:
        assert text in proc.stderr, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    return proc.stderr


@pytest.mark.parametrize(
    "content, problem",
    [
        (f"root:x:0:0:{SECRET}:/root:/bin/bash\n", "its top level is a single value"),
        (f"PASSWORD: {SECRET}\nUSER: me\n", "its top level has none of the keys a profile"),
        (f"- {SECRET}\n", "its top level is a list"),
        (b"\xff\xfe" + SECRET.encode() + b"\x00" * 50, "not UTF-8 text"),
        (b"TOKEN=" + SECRET.encode() + b"\x00HOME=/\x00", "special characters are not allowed"),
    ],
    ids=["passwd", "mapping", "list", "binary", "environ"],
)
def test_extends_of_a_file_that_is_not_a_profile(
    tmp_path: Path, content: str | bytes, problem: str
) -> None:
    other = tmp_path / "other.txt"
    other.write_bytes(content if isinstance(content, bytes) else content.encode())
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {other}\ntraining: {{max_steps: 1}}\n")
    refused(
        apt("config", "validate", str(child), cwd=tmp_path),
        f"{other}: not an APT profile" if "UTF" in problem or "top" in problem else str(other),
        problem,
        f"(named by extends: at {child}:1)",
    )
    refused(apt("config", "validate", str(other), cwd=tmp_path), str(other), problem)


def test_billion_laughs_is_refused_in_a_blink(tmp_path: Path) -> None:
    lines = ["training: {max_steps: 1}", "a0: &a0 [" + ", ".join(["lol"] * 10) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    start = time.monotonic()
    proc = apt("config", "validate", str(bomb), cwd=tmp_path)
    assert time.monotonic() - start < 30
    refused(proc, f"{bomb}:6:", "more than 100,000 YAML nodes")


def test_recursive_alias_and_list_key(tmp_path: Path) -> None:
    rec = tmp_path / "rec.yaml"
    rec.write_text("training: {max_steps: 1}\nx: &x [1, *x]\n")
    refused(apt("config", "validate", str(rec), cwd=tmp_path), f"{rec}:2: recursive alias")
    key = tmp_path / "key.yaml"
    key.write_text("training: {max_steps: 1}\n[a, b]: 1\n")
    refused(apt("config", "validate", str(key), cwd=tmp_path), f"{key}:2: a mapping key is a list")


@pytest.mark.parametrize(
    "override, shown",
    [
        (f"training.seed=https://user:{SECRET}@host/x", "got 'https://user:***@host/x'"),
        (f"training.max_steps=s3://b/x?X-Amz-Signature={SECRET}", "X-Amz-Signature=***"),
        (f"not_a_section=postgres://u:{SECRET}@db", "[--set not_a_section=postgres://u:***@db]"),
        (f"training.task.url=https://u:{SECRET}@h", "training.task.url: unknown option"),
    ],
)
def test_refused_override_never_echoes_the_password(
    tmp_path: Path, override: str, shown: str
) -> None:
    refused(apt("config", "validate", "quickstart", "--set", override, cwd=tmp_path), shown)


def test_resolved_profile_hides_a_password(tmp_path: Path) -> None:
    url = f"artifacts.output_dir=https://u:{SECRET}@h/runs"
    proc = apt("profiles", "show", "quickstart", "--resolved", "--set", url, cwd=tmp_path)
    assert proc.returncode == 0 and "https://u:***@h/runs" in proc.stdout
    assert SECRET not in proc.stdout


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "training.optimizer.betas=[0.9,1.0]",
            "training.optimizer.betas: each beta must be in [0, 1)",
        ),
        ("training.device=banana", "use one of auto, cpu, cuda, cuda:N, mps"),
        ("training.lr=nan", "training.learning_rate: Input should be a finite number"),
        ("training.seed=-1", "training.seed: Input should be greater than or equal to 0"),
        ("model.vocab_size=100", "model.vocab_size: 100 is smaller than the vocabulary"),
        ("data.seq_len=4096", "data.seq_len: 4096 is longer than model.max_seq_len (128)"),
        ("artifacts.experiment_name=..", "artifacts.experiment_name: must be a folder name"),
    ],
)
def test_validate_reports_values_that_would_fail_later(
    tmp_path: Path, override: str, expected: str
) -> None:
    proc = apt("config", "validate", "quickstart", "--set", override, cwd=tmp_path)
    refused(proc, expected, f"[--set {override}]")


def test_a_cuda_device_the_machine_lacks(tmp_path: Path) -> None:
    import torch

    if torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    for command in (("config", "validate", "quickstart"), ("train", "--profile", "quickstart")):
        proc = apt(*command, "--set", "training.device=cuda:3", cwd=tmp_path)
        refused(proc, "training.device: 'cuda:3', but this machine has", "use device: auto")
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


def test_train_refuses_an_experiment_name_outside_the_run_root(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    proc = apt(
        "train",
        "--profile",
        "quickstart",
        "--set",
        "artifacts.experiment_name=../escape",
        cwd=tmp_path / "work",
    )
    refused(proc, "artifacts.experiment_name: must be one folder name, without / or \\")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
