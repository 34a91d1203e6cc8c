"""Issue 11: nothing is written outside where it belongs; the final export obeys on_save_error;
metrics.jsonl is strict JSON. Real CLI runs where the user's view matters, the library below."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from tiny_lm import BigramLM
from torch import nn

from apt.core.config import ArtifactsConfig, config_from_dict
from apt.core.errors import CheckpointError, ConfigError
from apt.trainops.artifacts import ArtifactManager, ExportError, RunFolderError, write_model
from apt.trainops.engine import Trainer

# cpu/tiny cut to 3 steps, a checkpoint every 2: steps 2 and 3 are saved.
TINY = (
    "training.max_steps=3",
    "training.checkpoints.save_interval=2",
    "data.max_corpus_bytes=8000",
    "eval.max_batches=1",
)


def apt(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m apt train --profile cpu/tiny`` with TINY and ``args``, in ``cwd``."""
    sets = [arg for s in TINY for arg in ("--set", s)]
    environ = {k: v for k, v in os.environ.items() if k != "APT_FAULT_INJECT"}
    return subprocess.run(
        [sys.executable, "-m", "apt", "train", "--profile", "cpu/tiny", *sets, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**environ, "OMP_NUM_THREADS": "1", **env},
    )


def tree(folder: Path) -> list[str]:
    """Every path under ``folder``, relative."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def strict_json(line: str) -> dict[str, object]:
    """``json.loads`` that refuses NaN, Infinity and -Infinity."""

    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    record: dict[str, object] = json.loads(line, parse_constant=refuse)
    return record


def data(n: int = 32) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": (torch.arange(12) + i) % 32} for i in range(n)]


def trainer(tmp_path: Path, **kwargs: object) -> Trainer:
    torch.manual_seed(0)
    options: dict[str, object] = {
        "batch_size": 4,
        "max_steps": 4,
        "save_interval": 2,
        "output_dir": str(tmp_path / "runs"),
        "experiment_name": "lib",
        **kwargs,
    }
    return Trainer(model=BigramLM(squash=False), train_dataset=data(), **options)  # type: ignore[arg-type]


# ------------------------------------------------------------ the run folder is one folder
BAD_NAMES = ["../../escape", "..", ".", "a/b", "/tmp/apt-escape-abs", "tab\there", ""]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_an_experiment_name_that_is_not_one_folder_name_is_refused(
    tmp_path: Path, name: str
) -> None:
    """Built from keywords or from an unvalidated section, the manager refuses it at once."""
    out = tmp_path / "out" / "runs"
    out.mkdir(parents=True)
    for build in (
        lambda: ArtifactManager(output_dir=out, experiment_name=name or "\0"),
        lambda: ArtifactManager(
            ArtifactsConfig.model_construct(output_dir=str(out), experiment_name=name)
        ),
    ):
        with pytest.raises(ConfigError, match=r"artifacts\.experiment_name"):
            build()
    assert tree(tmp_path) == ["out", "out/runs"]
    assert not Path("/tmp/apt-escape-abs").exists()


@pytest.mark.parametrize("name", ["../escape", ".", "/tmp/apt-escape-abs"])
def test_a_trainer_with_such_a_name_writes_nothing(in_tmp: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="experiment_name"):
        trainer(in_tmp, experiment_name=name, new_run=True)
    assert tree(in_tmp) == []
    assert not Path("/tmp/apt-escape-abs").exists()


def test_new_run_with_experiment_name_dot_moves_nothing(tmp_path: Path) -> None:
    """The output folder, with other runs in it, stays where it is."""
    (tmp_path / "runs" / "other").mkdir(parents=True)
    (tmp_path / "runs" / "other" / "metrics.jsonl").write_text("{}\n")
    proc = apt("--set", "artifacts.experiment_name=.", "--new-run", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "experiment_name" in proc.stderr and "Traceback" not in proc.stderr
    assert tree(tmp_path) == ["runs", "runs/other", "runs/other/metrics.jsonl"]


def test_archive_moves_the_run_folder_and_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    for name in ("a", "b"):
        (out / name).mkdir(parents=True)
        (out / name / "metrics.jsonl").write_text(name)
    manager = ArtifactManager(output_dir=out, experiment_name="a")
    manager.lock()
    moved = manager.archive_existing()
    assert moved is not None and moved.parent == out and moved.name.startswith("a-")
    assert (moved / "metrics.jsonl").read_text() == "a" and not (moved / ".lock").exists()
    assert (out / "b" / "metrics.jsonl").read_text() == "b"
    # The lock moved on to the new, empty run folder.
    assert manager.locked and sorted(p.name for p in (out / "a").iterdir()) == [".lock"]
    manager.unlock()
    second = manager.archive_existing()  # most likely within the same second: a name of its own
    assert second is not None and second != moved and moved.is_dir() and second.is_dir()
    assert sorted(p.name for p in out.iterdir()) == sorted(["b", moved.name, second.name])


# ------------------------------------------------------------ output_dir that cannot be used
def test_output_dir_that_is_a_file_exits_2_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a folder")
    for value, shown in (("afile", tmp_path / "afile"), ("afile/runs", tmp_path / "afile")):
        proc = apt("--set", f"artifacts.output_dir={value}", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "artifacts.output_dir" in proc.stderr and str(shown) in proc.stderr
        assert "Traceback" not in proc.stderr and "NotADirectoryError" not in proc.stderr
    assert tree(tmp_path) == ["afile"]


def test_a_run_folder_that_is_a_file_exits_2_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").write_text("")
    proc = apt(cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"artifacts.experiment_name: {tmp_path / 'runs' / 'tiny'} is a file" in proc.stderr


def test_an_output_dir_without_write_permission_is_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The OS refusal (as a non-root user gets it) becomes a RunFolderError naming the key."""
    real_mkdir = Path.mkdir

    def denied(self: Path, *args: object, **kwargs: object) -> None:
        if self.name == "run":
            raise PermissionError(13, "Permission denied", str(self))
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", denied)
    manager = ArtifactManager(output_dir=tmp_path / "ro", experiment_name="run")
    with pytest.raises(RunFolderError) as caught:
        manager.lock()
    assert caught.value.exit_code == 2
    assert "artifacts.output_dir" in str(caught.value) and "permission denied" in str(caught.value)
    assert str(tmp_path / "ro" / "run") in str(caught.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission")
def test_a_read_only_output_dir_exits_2(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        proc = apt("--set", "artifacts.output_dir=ro", cwd=tmp_path)
    finally:
        ro.chmod(0o700)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "artifacts.output_dir" in proc.stderr and "permission denied" in proc.stderr


# ------------------------------------------------------------ where checkpoints go
@pytest.mark.parametrize("directory", ["../../../x", "../ckpt", "a/../../b"])
def test_a_relative_checkpoint_directory_may_not_climb_out(tmp_path: Path, directory: str) -> None:
    work = tmp_path / "one" / "two" / "three"
    work.mkdir(parents=True)
    proc = apt("--set", f"training.checkpoints.directory={directory}", cwd=work)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "training.checkpoints.directory" in proc.stderr and "climbs out" in proc.stderr
    assert tree(tmp_path) == ["one", "one/two", "one/two/three"]


def test_a_checkpoint_directory_outside_the_run_folder_is_said_at_start(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "ckpt"
    proc = apt("--set", f"training.checkpoints.directory={elsewhere}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"checkpoints: {elsewhere} (outside the run folder)" in proc.stderr
    assert sorted(p.name for p in elsewhere.iterdir()) == [
        "LATEST",
        "step-000000002",
        "step-000000003",
    ]
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()
    # Relative and inside the working directory: allowed, and said as well.
    sets = ("training.checkpoints.directory=ckpt", "artifacts.experiment_name=rel")
    proc = apt(*(arg for s in sets for arg in ("--set", s)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"checkpoints: {tmp_path / 'ckpt'} (outside the run folder)" in proc.stderr
    assert (tmp_path / "ckpt" / "LATEST").is_file()


def test_the_default_and_an_inside_directory_say_nothing(tmp_path: Path) -> None:
    proc = apt("--set", "training.checkpoints.directory=runs/tiny/ckpts", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "outside the run folder" not in proc.stderr
    assert (tmp_path / "runs" / "tiny" / "ckpts" / "LATEST").is_file()


def test_new_run_refuses_to_start_over_on_checkpoints_it_would_resume(in_tmp: Path) -> None:
    ckpt = in_tmp / "shared-ckpt"
    trainer(in_tmp, checkpoint_dir=str(ckpt)).train()
    with pytest.raises(RunFolderError, match="--new-run moves only the run folder"):
        trainer(in_tmp, checkpoint_dir=str(ckpt), new_run=True)
    assert (in_tmp / "runs" / "lib" / "config.yaml").is_file()  # not moved either
    assert not (in_tmp / "runs" / "lib" / ".lock").exists()


# ------------------------------------------------------------ the final export
def test_final_export_on_a_full_disk_with_continue_warns_and_exits_0(tmp_path: Path) -> None:
    proc = apt(
        "--set",
        "training.checkpoints.on_save_error=continue",
        cwd=tmp_path,
        APT_FAULT_INJECT="enospc_on_write,enospc_on_export",
    )
    run = tmp_path / "runs" / "tiny"
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "SafetensorError" not in proc.stderr
    assert f"disk full while exporting the model of step 3 to {Path('runs/tiny/final_model')}" in (
        proc.stderr
    )
    assert "on_save_error: continue" in proc.stderr
    assert "final model: NOT exported" in proc.stdout
    assert not (run / "final_model").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".final_model")]


def test_final_export_on_a_full_disk_with_stop_fails_then_the_rerun_exports(
    tmp_path: Path,
) -> None:
    proc = apt(cwd=tmp_path, APT_FAULT_INJECT="enospc_on_export@3")
    run = tmp_path / "runs" / "tiny"
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "disk full while exporting the model of step 3 to runs/tiny/final_model" in proc.stderr
    assert "No space left on device" in proc.stderr and "on_save_error: stop" in proc.stderr
    assert not (run / "final_model").exists()
    # Stopped before the final checkpoint: the rerun trains step 3 again and exports.
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step-000000002"
    assert not (run / ".lock").exists()
    rerun = apt(cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed from runs/tiny/checkpoints/step-000000002" in rerun.stderr
    assert sorted(p.name for p in (run / "final_model").iterdir()) == [
        "apt_tokenizer.json",  # the byte tokenizer of the run's data
        "config.json",
        "model.safetensors",
    ]


def test_the_library_applies_the_same_policy(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("APT_FAULT_INJECT", "enospc_on_export")
    stopped = trainer(in_tmp, experiment_name="stop")
    with pytest.raises(CheckpointError, match="on_save_error: stop") as caught:
        stopped.train()
    assert "No space left on device" in str(caught.value)
    assert not (in_tmp / "runs" / "stop" / ".lock").exists()  # released on the error
    settings = stopped.config.to_dict()
    settings["training"]["checkpoints"]["on_save_error"] = "continue"
    settings["artifacts"]["experiment_name"] = "lib"
    cfg = config_from_dict(settings, source="test")
    with caplog.at_level("WARNING", logger="apt"):
        result = Trainer(model=BigramLM(squash=False), train_dataset=data(), config=cfg).train()
    assert result.finished and result.global_step == 4
    assert result.export_error is not None and "disk full" in result.export_error
    assert "The run ends without final_model" in caplog.text
    assert (in_tmp / "runs" / "lib" / "checkpoints" / "step-000000004").is_dir()
    assert not (in_tmp / "runs" / "lib" / "final_model").exists()


def test_a_safetensors_write_error_becomes_an_export_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain module goes through safetensors' own writer, which reports the OS error in
    its text; the previous export is kept and nothing is staged."""
    import safetensors.torch

    target = tmp_path / "export"
    write_model(nn.Linear(2, 2), target)
    before = (target / "model.safetensors").read_bytes()

    def full(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ExportError, match="disk full while exporting the model to") as caught:
        write_model(nn.Linear(2, 2), target)
    assert caught.value.disk_full and caught.value.path == target
    assert (target / "model.safetensors").read_bytes() == before
    assert tree(tmp_path) == ["export", "export/model.safetensors"]


# ------------------------------------------------------------ metrics.jsonl is JSON
def test_non_finite_metrics_are_written_as_null(tmp_path: Path) -> None:
    manager = ArtifactManager(output_dir=tmp_path, experiment_name="m")
    manager.log_metrics({"train_loss": math.nan, "grad_norm": math.inf, "lr": 1e-3}, step=1)
    manager.log_metrics({"train_loss": 2.5, "val_loss": -math.inf}, step=2)
    manager.close()
    lines = (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()
    records = [strict_json(line) for line in lines]
    assert [(r["step"], r["train_loss"]) for r in records] == [(1, None), (2, 2.5)]
    assert records[0]["grad_norm"] is None and records[0]["lr"] == 1e-3
    assert records[1]["val_loss"] is None
    assert manager.read_metrics() == records
