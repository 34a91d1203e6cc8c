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
        (("config", "validate", "missing.yaml"), "missing.yaml: no such file"),
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
    preset = apt("profiles", "show", "standard", "--resolved", cwd=tmp_path).stdout.splitlines()
    assert any(
        line.strip().startswith("num_layers: 12") and "# preset small" in line for line in preset
    )
    where = dict(line.split(None, 1) for line in listed.stdout.splitlines())
    assert where["quickstart"].strip() == "packaged with APT"


def test_bare_command_version_and_program_name(tmp_path: Path) -> None:
    bare = apt(cwd=tmp_path)
    assert bare.returncode == 0 and "COMMAND" in bare.stdout and "train" in bare.stdout
    version = apt("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip().endswith(apt_version())
    script = Path(sys.executable).with_name("apt-train")
    named = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert named.returncode == 0 and named.stdout.startswith("usage: apt-train")


def apt_version() -> str:
    from apt import __version__

    return __version__


def test_a_closed_stdout_ends_quietly(tmp_path: Path) -> None:
    """``profiles show standard --resolved | head -2``: no BrokenPipeError traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "apt", "profiles", "show", "standard", "--resolved"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # what head does after its lines
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0 and first.startswith("# standard")
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_schema_and_tasks(tmp_path: Path) -> None:
    schema = json.loads(apt("config", "schema", cwd=tmp_path).stdout)
    assert {"model", "training", "schedules", "extends"} <= set(schema["properties"])
    tasks = apt("tasks", cwd=tmp_path)
    assert tasks.returncode == 0 and {"causal_lm", "regression"} <= set(tasks.stdout.split())
    described = dict(line.split(None, 1) for line in tasks.stdout.splitlines()[:2])
    assert "cross-entropy" in described["causal_lm"] and "squared" in described["regression"]


@pytest.mark.parametrize("command", [("tasks",), ("config", "validate", "quickstart")])
def test_inspecting_commands_do_not_import_torch(tmp_path: Path, command: tuple[str, ...]) -> None:
    probe = (
        "import sys, runpy; sys.argv = ['apt', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('apt', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'imported torch'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, *command], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_callback_typos_are_all_reported_with_their_lines(tmp_path: Path) -> None:
    bad = tmp_path / "cb.yaml"
    bad.write_text(
        "extends: quickstart\ncallbacks:\n"
        "  - {name: early_stopping, patiense: 2}\n"
        "  - {name: lr_monitr}\n"
    )
    proc = apt("config", "validate", str(bad), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "did you mean 'patience'" in proc.stderr and f"{bad}:3" in proc.stderr
    assert "Did you mean 'lr_monitor'" in proc.stderr and f"{bad}:4" in proc.stderr


def test_a_task_in_the_users_own_module(tmp_path: Path) -> None:
    (tmp_path / "my_tasks.py").write_text(
        "from apt.trainops.engine.tasks import RegressionTask\n\n\n"
        'class Mine(RegressionTask):\n    """My own task."""\n'
    )
    proc = apt(
        *("train", "--profile", "cpu/tiny", "--task", "my_tasks:Mine"),
        *("--set", "training.max_steps=2", "--set", "artifacts.experiment_name=mine"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "val_perplexity" not in (tmp_path / "runs/mine/metrics.jsonl").read_text()


def test_a_finished_run_run_again_prints_no_new_sample(tmp_path: Path) -> None:
    args = (
        *("train", "--profile", "cpu/tiny", "--set", "training.max_steps=3"),
        *("--set", "artifacts.sample_prompt=def "),
    )
    first = apt(*args, cwd=tmp_path)
    assert first.returncode == 0 and "sample:" in first.stdout, first.stderr
    again = apt(*args, cwd=tmp_path)
    assert again.returncode == 0 and "run already complete" in again.stderr
    assert "sample:" not in again.stdout
