"""The command line as users run it: real subprocesses, exit codes, messages, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def apt(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apt", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_validate_rejects_a_misspelled_key_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: quickstart\ntraining:\n  learning_rat: 0.1\n")
    proc = apt("config", "validate", str(bad), cwd=tmp_path)
    assert proc.returncode == 2
    assert "training.learning_rat" in proc.stderr and "Did you mean 'learning_rate'" in proc.stderr
    assert f"{bad}:3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_validate_accepts_a_good_profile(tmp_path: Path) -> None:
    proc = apt("config", "validate", str(REPO / "profiles" / "quickstart.yaml"), cwd=tmp_path)
    assert proc.returncode == 0 and "OK" in proc.stdout


def test_validate_checks_callback_names(tmp_path: Path) -> None:
    bad = tmp_path / "cb.yaml"
    bad.write_text("extends: quickstart\ncallbacks:\n  - {name: early_stoping, patience: 2}\n")
    proc = apt("config", "validate", str(bad), cwd=tmp_path)
    assert (
        proc.returncode == 2 and "early_stopping" in proc.stderr and "Traceback" not in proc.stderr
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (("train", "--profile", "no_such_profile"), "not found"),
        (("train", "--profile", "quickstart", "--set", "training.max_steps"), "section.key=value"),
        (
            ("train", "--profile", "quickstart", "--set", "training.max_steps=-1"),
            "greater than or equal to 1",
        ),
        (("train", "--profile", "quickstart", "--task", "classify"), "unknown task 'classify'"),
        (("frobnicate",), "invalid choice"),
        ((), "required"),
    ],
)
def test_configuration_and_usage_errors_exit_2(
    tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    proc = apt(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr


def test_data_errors_exit_1_with_a_message(tmp_path: Path) -> None:
    proc = apt(
        "train",
        "--profile",
        "quickstart",
        "--set",
        "data.source=files",
        "--set",
        "data.train_files=[missing/*.txt]",
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "missing/*.txt" in proc.stderr and "Traceback" not in proc.stderr


def test_profiles_list_and_show(tmp_path: Path) -> None:
    listed = apt("profiles", "list", cwd=tmp_path)
    assert listed.returncode == 0 and {"quickstart", "standard"} <= set(listed.stdout.split())
    raw = apt("profiles", "show", "standard", cwd=tmp_path)
    assert raw.returncode == 0 and "preset: small" in raw.stdout
    resolved = apt(
        "profiles", "show", "quickstart", "--resolved", "--set", "training.seed=7", cwd=tmp_path
    )
    assert resolved.returncode == 0
    lines = resolved.stdout.splitlines()
    assert any(
        line.strip().startswith("seed: 7") and "--set training.seed=7" in line for line in lines
    )
    assert any(
        line.strip().startswith("hidden_size: 128") and "quickstart.yaml:6" in line
        for line in lines
    )
    assert any(line.strip().startswith("dropout: 0.0") and "# default" in line for line in lines)


def test_schema_and_tasks(tmp_path: Path) -> None:
    schema = json.loads(apt("config", "schema", cwd=tmp_path).stdout)
    assert {"model", "training", "schedules", "extends"} <= set(schema["properties"])
    tasks = apt("tasks", cwd=tmp_path)
    assert tasks.returncode == 0 and {"causal_lm", "regression"} <= set(tasks.stdout.split())
