"""TensorBoard: event files read back with TensorBoard's EventAccumulator."""

from __future__ import annotations

from pathlib import Path

from monitoring_stores import (
    CANARY,
    HPARAMS,
    files_with,
    tensorboard,
    tensorboard_scalars,
    tensorboard_text,
)

from apt.trainops.monitoring import JsonlLogger, Monitor, TensorBoardLogger


def monitor(run_dir: Path) -> Monitor:
    return Monitor([JsonlLogger(), TensorBoardLogger(flush_seconds=30)], run_dir=run_dir)


def test_scalars_and_config_read_back(tmp_path: Path) -> None:
    m = monitor(tmp_path)
    m.start("exp", 0, HPARAMS)
    for step in (10, 20, 30):
        m.log({"train_loss": step / 10, "val/loss": step / 5}, step)
    m.finish()
    log_dir = tmp_path / "tensorboard"
    assert tensorboard_scalars(log_dir, "train_loss") == [(10, 1.0), (20, 2.0), (30, 3.0)]
    assert tensorboard_scalars(log_dir, "val/loss") == [(10, 2.0), (20, 4.0), (30, 6.0)]
    text = tensorboard_text(log_dir)
    assert "    training:\n" in text and "      lr: 0.0003" in text  # YAML, as a code block
    assert "api_token: '***'" in text and "https://u:***@host/data" in text
    # The HParams dashboard's three summaries, in this run's own folder.
    hparams = tensorboard(log_dir).PluginTagToContent("hparams")
    assert set(hparams) == {
        "_hparams_/experiment",
        "_hparams_/session_start_info",
        "_hparams_/session_end_info",
    }
    assert b"model.hidden_size" in hparams["_hparams_/session_start_info"]
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["tensorboard"]
    assert files_with(tmp_path, CANARY) == []


def test_a_resumed_run_replaces_the_points_after_its_checkpoint(tmp_path: Path) -> None:
    first = monitor(tmp_path)
    first.start("exp", 0, HPARAMS)
    for step in (10, 20, 30, 40, 50):
        first.log({"train_loss": float(step)}, step)
    # On disk as each report returns, not after flush_seconds: a kill now would lose nothing.
    assert len(tensorboard_scalars(tmp_path / "tensorboard", "train_loss")) == 5
    del first  # killed after step 50 (its checkpoint is at step 30)

    second = monitor(tmp_path)
    second.start("exp", 30, HPARAMS)
    for step in (40, 50, 60):
        second.log({"train_loss": -float(step)}, step)
    second.finish()
    assert tensorboard_scalars(tmp_path / "tensorboard", "train_loss") == [
        (10, 10.0),
        (20, 20.0),
        (30, 30.0),
        (40, -40.0),
        (50, -50.0),
        (60, -60.0),
    ]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    # The config was written once, by the process that started the TensorBoard run.
    assert tensorboard_text(tmp_path / "tensorboard").count("training:") == 1


def test_a_run_restarted_from_step_0_hides_everything_before(tmp_path: Path) -> None:
    first = monitor(tmp_path)
    first.start("exp", 0, {})
    first.log({"train_loss": 1.0}, 10)
    del first  # killed before its first checkpoint: the next process starts at step 0
    second = monitor(tmp_path)
    second.start("exp", 0, {})
    second.log({"train_loss": 2.0}, 10)
    second.finish()
    assert tensorboard_scalars(tmp_path / "tensorboard", "train_loss") == [(10, 2.0)]
