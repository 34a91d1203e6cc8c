"""``plots/``: loss and learning-rate curves from ``metrics.jsonl``; skipped without matplotlib."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from apt.trainops.artifacts import ArtifactManager
from apt.trainops.artifacts.plots import PLOTS_SKIPPED, read_series

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(path: Path, records: list[dict[str, Any]], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def resumed_run() -> list[dict[str, Any]]:
    """Steps 1-4 trained, killed, resumed from the checkpoint of step 2: steps 3-4 again."""
    first: list[dict[str, Any]] = [
        {"step": s, "train_loss": 10.0 - s, "lr": 0.1 * s} for s in (1, 2, 3, 4)
    ]
    evals: list[dict[str, Any]] = [{"step": 2, "val_loss": 9.0}, {"step": 4, "val_loss": 99.0}]
    again: list[dict[str, Any]] = [
        {"step": s, "train_loss": 5.0 - s, "lr": 0.1 * s} for s in (3, 4)
    ]
    return [*first, *evals, *again, {"step": 4, "val_loss": 1.5}]


def test_the_latest_record_of_each_step_wins(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    records = [*resumed_run(), {"step": 5, "train_loss": None, "lr": 0.5, "note": "x"}]
    write_metrics(metrics, records, tail='{"step": 6, "train_lo')  # a killed run's last line
    series = read_series(metrics)
    assert series["train_loss"] == {1: 9.0, 2: 8.0, 3: 2.0, 4: 1.0}  # null at 5 is a gap
    assert series["val_loss"] == {2: 9.0, 4: 1.5}  # the train record of step 4 keeps it
    assert series["lr"] == {1: 0.1, 2: 0.2, 3: pytest.approx(0.3), 4: 0.4, 5: 0.5}
    assert "note" not in series and "time" not in series
    assert read_series(tmp_path / "missing.jsonl") == {}


def test_loss_and_lr_plots_are_valid_png_images(tmp_path: Path) -> None:
    image = pytest.importorskip("matplotlib.image")
    manager = ArtifactManager(output_dir=tmp_path, experiment_name="run")
    for record in resumed_run():
        step = record.pop("step")
        manager.log_metrics(record, step=step)
    manager.log_metrics({"lr/group_0": 0.1, "lr/group_1": 0.01}, step=4)
    written = manager.save_plots()
    plots = tmp_path / "run" / "plots"
    assert written == [plots / "loss.png", plots / "lr.png"]
    assert sorted(p.name for p in plots.iterdir()) == ["loss.png", "lr.png"]  # no staging left
    for path in written:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
        pixels = image.imread(path)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.std() > 0  # something is drawn


def test_only_the_figures_with_data_are_drawn(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    manager = ArtifactManager(output_dir=tmp_path, experiment_name="run")
    manager.log_metrics({"val_loss": 3.0}, step=1)
    assert [p.name for p in manager.save_plots()] == ["loss.png"]
    empty = ArtifactManager(output_dir=tmp_path, experiment_name="empty")
    assert empty.save_plots() == []
    assert not (tmp_path / "empty" / "plots").exists()


def test_without_matplotlib_plots_are_skipped_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError
    manager = ArtifactManager(output_dir=tmp_path, experiment_name="run")
    manager.log_metrics({"train_loss": 2.0, "lr": 0.1}, step=1)
    with caplog.at_level(logging.INFO, logger="apt"):
        assert manager.save_plots() == []
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("INFO", PLOTS_SKIPPED)]
    assert PLOTS_SKIPPED == 'plots/ skipped: pip install "apt-transformer[plots]"'
    assert not (tmp_path / "run" / "plots").exists()


def test_a_plot_that_cannot_be_written_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("matplotlib")
    manager = ArtifactManager(output_dir=tmp_path, experiment_name="run")
    manager.log_metrics({"train_loss": 2.0}, step=1)
    (tmp_path / "run" / "plots").write_text("a file where the folder goes")
    with caplog.at_level(logging.INFO, logger="apt"):
        assert manager.save_plots() == []
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert caplog.records[0].getMessage().startswith("plots/ not written: ")


def test_other_ranks_draw_nothing(tmp_path: Path) -> None:
    write_metrics(tmp_path / "run" / "metrics.jsonl", resumed_run())
    manager = ArtifactManager(output_dir=tmp_path, experiment_name="run", is_main=False)
    assert manager.save_plots() == []
    assert not (tmp_path / "run" / "plots").exists()
