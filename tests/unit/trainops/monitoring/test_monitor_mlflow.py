"""MLflow: a real sqlite store, read back with MlflowClient."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monitoring_stores import CANARY, HPARAMS, files_with, mlflow_history, mlflow_run

from apt.core.config.monitoring import MLflowLoggerConfig
from apt.trainops.monitoring import JsonlLogger, MLflowLogger, Monitor, build_logger
from apt.trainops.monitoring.mlflow_logger import mlflow_key


def logger(uri: str, experiment: str, **options: object) -> MLflowLogger:
    cfg = MLflowLoggerConfig(tracking_uri=uri, experiment=experiment, **options)
    built = build_logger(cfg, output_dir=Path("unused"))
    assert isinstance(built, MLflowLogger)
    return built


def test_a_resumed_run_continues_the_same_mlflow_run(
    tmp_path: Path, mlflow_store: str, mlflow_experiment: str
) -> None:
    first = Monitor(
        [JsonlLogger(), logger(mlflow_store, mlflow_experiment, tags={"team": "nlp"})],
        run_dir=tmp_path,
    )
    first.start("exp", 0, HPARAMS)
    for step in (10, 20, 30, 40, 50):
        first.log({"train_loss": float(step), "val/loss@1k": step / 2}, step)
    del first  # killed after step 50: the MLflow run stays RUNNING
    saved = json.loads((tmp_path / "monitoring.json").read_text("utf-8"))["mlflow"]
    run_id = saved["run_id"]
    assert mlflow_run(mlflow_store, run_id).info.status == "RUNNING"

    second_logger = logger(mlflow_store, mlflow_experiment)
    second = Monitor([JsonlLogger(), second_logger], run_dir=tmp_path)
    second.start("exp", 30, {"changed": "not sent: MLflow parameters cannot change"})
    assert second_logger.run_id == run_id
    for step in (40, 50, 60):
        second.log({"train_loss": -float(step), "val/loss@1k": -step / 2}, step)
    second.finish()

    # 40 and 50 from the first process (MLflow keeps what it got), 60 from the second.
    assert mlflow_history(mlflow_store, run_id, "train_loss") == [
        (10, 10.0),
        (20, 20.0),
        (30, 30.0),
        (40, 40.0),
        (50, 50.0),
        (60, -60.0),
    ]
    assert [s for s, _ in mlflow_history(mlflow_store, run_id, "val/loss_1k")] == [
        10,
        20,
        30,
        40,
        50,
        60,
    ]
    run = mlflow_run(mlflow_store, run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "exp"
    assert run.data.tags["team"] == "nlp"
    assert run.data.params == {
        "model.num_layers": "2",
        "model.hidden_size": "16",
        "model.dropout": "0.1",
        "model.tied": "True",
        "training.lr": "0.0003",
        "training.optimizer.kind": "adamw",
        "training.optimizer.betas": "[0.9, 0.95]",
        "data.api_token": "***",
        "data.source": "https://u:***@host/data",
        "note": "None",
    }
    assert saved == {
        "run_id": run_id,
        "experiment_id": run.info.experiment_id,
        "tracking_uri": mlflow_store,
        "last_step": 50,
    }
    assert files_with(Path(mlflow_store.removeprefix("sqlite:///")).parent, CANARY) == []


def test_long_and_many_parameters_respect_mlflow_limits(
    tmp_path: Path, mlflow_store: str, mlflow_experiment: str
) -> None:
    params = {"block": {f"p{i}": i for i in range(250)}, "prompt": "x" * 7000}
    monitor = Monitor([logger(mlflow_store, mlflow_experiment)], run_dir=tmp_path)
    monitor.start("exp", 0, params)
    monitor.finish()
    run_id = json.loads((tmp_path / "monitoring.json").read_text("utf-8"))["mlflow"]["run_id"]
    logged = mlflow_run(mlflow_store, run_id).data.params
    assert monitor.active == ["mlflow"]  # nothing failed (more than 100 params is 3 requests)
    assert len(logged) == 251 and logged["block.p249"] == "249"
    assert logged["prompt"] == "x" * 6000


def test_the_default_store_is_a_sqlite_file_in_output_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    built = build_logger(MLflowLoggerConfig(experiment="e"), output_dir=tmp_path / "out")
    monitor = Monitor([built], run_dir=tmp_path / "out" / "exp")
    monitor.start("exp", 0, {})
    monitor.log({"train_loss": 1.5}, 1)
    monitor.finish()
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    assert isinstance(built, MLflowLogger) and built.tracking_uri == uri
    assert mlflow_history(uri, built.run_id or "", "train_loss") == [(1, 1.5)]


def test_mlflow_tracking_uri_is_used_when_the_config_names_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    built = build_logger(MLflowLoggerConfig(experiment="from-env"), output_dir=tmp_path)
    Monitor([built], run_dir=tmp_path).start("exp", 0, {})
    assert isinstance(built, MLflowLogger) and built.tracking_uri == mlflow_store
    assert mlflow_run(mlflow_store, built.run_id or "").info.status == "RUNNING"


def test_the_saved_state_never_holds_a_password() -> None:
    built = MLflowLogger("https://alice:hunter2@mlflow.example.com", default_uri="unused")
    built.run_id, built.experiment_id = "abc", "1"
    assert built.state_dict()["tracking_uri"] == "https://alice:***@mlflow.example.com"


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("train_loss", "train_loss"),
        ("val/loss", "val/loss"),
        ("val/loss@1k", "val/loss_1k"),
        ("acc[top-5]", "acc_top-5_"),
        ("time: step", "time: step"),
        ("/a//./b/", "a/b"),
        ("../up", "up"),
        ("é", "_"),
        ("k" * 300, "k" * 250),
    ],
)
def test_metric_keys_become_valid_mlflow_keys(name: str, key: str) -> None:
    from mlflow.utils.validation import _validate_metric_name

    assert mlflow_key(name) == key
    _validate_metric_name(mlflow_key(name))  # MLflow's own check accepts it


def test_a_finished_run_that_trains_further_is_running_again(
    tmp_path: Path, mlflow_store: str, mlflow_experiment: str
) -> None:
    first = Monitor([logger(mlflow_store, mlflow_experiment)], run_dir=tmp_path)
    first.start("exp", 0, {})
    first.log({"train_loss": 1.0}, 10)
    first.finish()
    run_id = json.loads((tmp_path / "monitoring.json").read_text("utf-8"))["mlflow"]["run_id"]
    assert mlflow_run(mlflow_store, run_id).info.status == "FINISHED"
    second = Monitor([logger(mlflow_store, mlflow_experiment)], run_dir=tmp_path)
    second.start("exp", 10, {})
    assert mlflow_run(mlflow_store, run_id).info.status == "RUNNING"
    second.log({"train_loss": 0.5}, 20)
    second.finish()
    assert mlflow_history(mlflow_store, run_id, "train_loss") == [(10, 1.0), (20, 0.5)]


def test_a_saved_run_the_store_lacks_is_one_clear_warning(
    tmp_path: Path, mlflow_store: str, mlflow_experiment: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "monitoring.json").write_text(
        json.dumps({"mlflow": {"run_id": "0123456789abcdef0123456789abcdef", "last_step": 5}}),
        encoding="utf-8",
    )
    monitor = Monitor([JsonlLogger(), logger(mlflow_store, mlflow_experiment)], run_dir=tmp_path)
    monitor.start("exp", 5, {})
    monitor.log({"train_loss": 1.0}, 10)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= 30]
    assert "the mlflow logger failed in start" in warning
    assert "0123456789abcdef0123456789abcdef of this run folder is not in" in warning
    assert monitor.active == ["jsonl"]
    # The entry is kept: pointing tracking_uri back to the right store continues that run.
    saved = json.loads((tmp_path / "monitoring.json").read_text("utf-8"))["mlflow"]
    assert saved["run_id"] == "0123456789abcdef0123456789abcdef"
