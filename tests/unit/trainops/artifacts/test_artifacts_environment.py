"""``env.json``: versions, git state, command line and the allow-listed variables, redacted."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apt.core.version import __version__
from apt.trainops.artifacts import ArtifactManager, describe_environment

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with one commit of one file."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    (root / "train.py").write_text("print(1)\n")
    git(root, "add", "train.py")
    git(root, "commit", "-q", "-m", "first")
    return root


def test_versions_and_hardware_of_this_process(tmp_path: Path) -> None:
    env = describe_environment(argv=["apt", "train"], environ={}, cwd=tmp_path)
    assert env["python"] == platform.python_version()
    assert env["torch"] == torch.__version__
    assert env["apt"] == __version__
    assert env["cuda"] == torch.version.cuda  # None on a CPU build
    expected = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    assert env["gpus"] == (expected if torch.cuda.is_available() else [])
    assert env["hostname"] and env["platform"]
    assert env["command"] == ["apt", "train"]
    assert env["world_size"] is None and env["rank"] is None
    json.dumps(env, allow_nan=False)  # JSON as it is


@needs_git
def test_git_commit_and_dirty_state(repo: Path) -> None:
    head = git(repo, "rev-parse", "HEAD")
    assert describe_environment(cwd=repo)["git"] == {"commit": head, "dirty": False}
    (repo / "untracked.txt").write_text("x")  # untracked files are not the code that ran
    assert describe_environment(cwd=repo)["git"] == {"commit": head, "dirty": False}
    (repo / "train.py").write_text("print(2)\n")
    assert describe_environment(cwd=repo / ".")["git"] == {"commit": head, "dirty": True}


@needs_git
def test_git_is_null_outside_a_repository_and_before_the_first_commit(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    assert describe_environment(cwd=plain)["git"] is None
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    assert describe_environment(cwd=empty)["git"] is None


def test_git_is_null_when_git_is_not_installed(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    assert describe_environment(cwd=repo)["git"] is None


def test_only_allow_listed_variables_are_kept_and_secrets_masked(tmp_path: Path) -> None:
    environ = {
        "CUDA_VISIBLE_DEVICES": "0,1",
        "OMP_NUM_THREADS": "4",
        "WORLD_SIZE": "8",
        "RANK": "3",
        "NCCL_DEBUG": "INFO",
        "NCCL_IB_TOKEN": "tok-123",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "TORCH_STORE_URL": "tcp://admin:pw-9@10.0.0.1:29500",
        "APT_PROFILE_PATH": "/profiles",
        "MY_SERVICE_TOKEN": "tok-456",
        "HOME": "/home/me",
        "PATH": "/usr/bin",
    }
    env = describe_environment(argv=[], environ=environ, cwd=tmp_path)
    assert env["environment"] == {
        "APT_PROFILE_PATH": "/profiles",
        "CUDA_VISIBLE_DEVICES": "0,1",
        "NCCL_DEBUG": "INFO",
        "NCCL_IB_TOKEN": "***",
        "OMP_NUM_THREADS": "4",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "RANK": "3",
        "TORCH_STORE_URL": "tcp://admin:***@10.0.0.1:29500",
        "WORLD_SIZE": "8",
    }
    assert (env["world_size"], env["rank"]) == (8, 3)
    assert describe_environment(environ={"WORLD_SIZE": "many"}, cwd=tmp_path)["world_size"] is None


def test_command_line_is_redacted(tmp_path: Path) -> None:
    argv = [
        "apt",
        "train",
        "--set",
        "callbacks.0.args.api_token=tok-1",
        "--set",
        "data.url=https://bob:pw-2@data.example/x",
        "--hf-token",
        "tok-3",
        "--tokenizer",
        "byte",
        "--api-key",
        "--verbose",
    ]
    assert describe_environment(argv=argv, environ={}, cwd=tmp_path)["command"] == [
        "apt",
        "train",
        "--set",
        "callbacks.0.args.api_token=***",
        "--set",
        "data.url=https://bob:***@data.example/x",
        "--hf-token",
        "***",
        "--tokenizer",
        "byte",
        "--api-key",
        "--verbose",
    ]


def test_save_environment_writes_env_json_with_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["apt", "train", "--set", "x.password=pw-4"])
    manager = ArtifactManager(output_dir=tmp_path, experiment_name="run")
    path = manager.save_environment({"device": "cpu", "world_size": 1, "lr": float("nan")})
    assert path == tmp_path / "run" / "env.json"
    env = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c))
    assert env["device"] == "cpu" and env["world_size"] == 1 and env["lr"] is None
    assert env["command"] == ["apt", "train", "--set", "x.password=***"]
    assert [p.name for p in path.parent.iterdir()] == ["env.json"]  # no staging file left
    path.write_text("{}")
    manager.save_environment()  # a restart replaces it whole
    assert json.loads(path.read_text())["apt"] == __version__


def test_save_environment_writes_nothing_on_other_ranks(tmp_path: Path) -> None:
    manager = ArtifactManager(output_dir=tmp_path, experiment_name="run", is_main=False)
    assert manager.save_environment() is None
    assert list(tmp_path.iterdir()) == []
