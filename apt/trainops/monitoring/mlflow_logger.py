"""``kind: mlflow``: an MLflow run, continued by a resumed process.

Only an explicit :class:`mlflow.MlflowClient` is used, never MLflow's global active run, so the
application's own MLflow runs are left alone. The run id is kept in ``<run>/monitoring.json``;
a resumed process reopens that run (status RUNNING again) and the Monitor skips the steps it
already sent. The parameters (the redacted config, flattened) are logged once, by the process
that created the run: MLflow refuses to change a parameter.
"""

from __future__ import annotations

import importlib.util
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

from apt.core.redact import redact
from apt.trainops.monitoring.base import MetricLogger, RunInfo
from apt.trainops.monitoring.errors import MonitoringError
from apt.trainops.monitoring.params import flatten_params

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = ["MLflowLogger", "mlflow_key"]

T = TypeVar("T")

# MLflow's rule for metric and parameter names (mlflow.utils.validation): alphanumerics,
# underscore, dash, period, space, slash and colon, and no name that a path would rewrite.
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_\-. /:]")
_MAX_KEY = 250  # MAX_ENTITY_KEY_LENGTH
_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores


def mlflow_key(name: str) -> str:
    """``name`` as a valid MLflow metric or parameter key: each other character becomes
    ``_``, empty, ``.`` and ``..`` path parts are dropped, and it is cut to 250 characters.

    >>> mlflow_key("val/loss@1k"), mlflow_key("/a//./b/")
    ('val/loss_1k', 'a/b')
    """
    parts = _NOT_ALLOWED.sub("_", name)[:_MAX_KEY].split("/")
    return "/".join(p for p in parts if p not in ("", ".", "..")) or "_"


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for first in range(0, len(items), size):
        yield items[first : first + size]


class MLflowLogger(MetricLogger):
    """Logs to an MLflow run through an explicit client.

    Args:
        tracking_uri: the tracking server or store (None: ``$MLFLOW_TRACKING_URI`` when set,
            else ``default_uri``).
        default_uri: the store used when neither is set.
        experiment: the experiment's name; created when missing.
        run_name: the name of a new run (None: the experiment name of the APT run).
        tags: tags of a new run.
    """

    kind = "mlflow"
    fix = (
        "check that monitoring.loggers[mlflow].tracking_uri (or $MLFLOW_TRACKING_URI) is "
        "reachable and its credentials (MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN) are valid"
    )

    def __init__(
        self,
        tracking_uri: str | None,
        *,
        default_uri: str,
        experiment: str = "apt",
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.default_uri = default_uri
        self.experiment = experiment
        self.run_name = run_name
        self.tags = dict(tags or {})
        self._client: MlflowClient | None = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None

    @classmethod
    def from_config(cls, cfg: Any, *, output_dir: Path) -> MLflowLogger:
        """From a :class:`~apt.core.config.monitoring.MLflowLoggerConfig`; the default store
        is ``sqlite:///<output_dir>/mlflow.db``, shared by the runs there."""
        return cls(
            cfg.tracking_uri,
            default_uri=f"sqlite:///{(output_dir / 'mlflow.db').absolute()}",
            experiment=cfg.experiment,
            run_name=cfg.run_name,
            tags=cfg.tags,
        )

    def start(self, run: RunInfo) -> None:
        """Reopen the saved MLflow run, or create one in the experiment.

        Raises:
            ImportError: mlflow is not installed.
            MonitoringError: a database store without its drivers, a deleted experiment, or
                a saved run that the store does not have.
            MlflowException: the store refused or could not be reached.
        """
        from mlflow import MlflowClient
        from mlflow.environment_variables import MLFLOW_TRACKING_URI

        if self.tracking_uri is None:
            env_uri = MLFLOW_TRACKING_URI.get() if MLFLOW_TRACKING_URI.is_set() else None
            self.tracking_uri = env_uri or self.default_uri
        self._check_drivers(self.tracking_uri)
        client = MlflowClient(tracking_uri=self.tracking_uri)
        saved = run.saved.get("run_id")
        if saved:
            self._reopen(client, saved)
        else:
            self.experiment_id = self._experiment_id(client)
            created = client.create_run(
                self.experiment_id, run_name=self.run_name or run.name, tags=self.tags
            )
            self.run_id = created.info.run_id
        self._client = client

    def log_hparams(self, params: dict[str, Any]) -> None:
        """The config, flattened to dotted keys, as the run's parameters (values as text, cut
        to MLflow's 6000 characters; sent 100 to a request)."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        client, run_id = self._started()
        flat: dict[str, str] = {}
        for key, value in flatten_params(params).items():
            flat.setdefault(mlflow_key(key), str(value)[:MAX_PARAM_VAL_LENGTH])
        entries = [Param(key, value) for key, value in flat.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=list(chunk))

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        client, run_id = self._started()
        now_ms = int(time.time() * 1000)
        entries = [
            Metric(mlflow_key(key), float(value), now_ms, step) for key, value in metrics.items()
        ]
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=list(chunk))

    def finish(self) -> None:
        if self._client is not None and self.run_id is not None:
            self._client.set_terminated(self.run_id, status="FINISHED")
            self._client = None

    def state_dict(self) -> dict[str, Any]:
        """The run and experiment ids, and the store's URI with any password hidden (kept to
        explain a mismatch; a resumed run uses the configured URI)."""
        if self.run_id is None:
            return {}
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "tracking_uri": redact(self.tracking_uri or ""),
        }

    def _started(self) -> tuple[MlflowClient, str]:
        if self._client is None or self.run_id is None:
            raise RuntimeError("MLflowLogger used before start()")
        return self._client, self.run_id

    @staticmethod
    def _check_drivers(uri: str) -> None:
        """A database store needs SQLAlchemy and Alembic, which mlflow-skinny lacks: say so
        instead of MLflow's 'unsupported URI'."""
        scheme = urlparse(uri).scheme.split("+")[0]
        missing = [m for m in ("sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
        if scheme in _DATABASES and missing:
            raise MonitoringError(
                f"the MLflow store {uri} is a {scheme} database, which needs "
                f"{' and '.join(missing)} (not installed with mlflow-skinny): pip install "
                "sqlalchemy alembic, or set monitoring.loggers[mlflow].tracking_uri to a server"
            )

    def _experiment_id(self, client: MlflowClient) -> str:
        """The id of the experiment named ``self.experiment``, created when missing."""
        from mlflow.exceptions import MlflowException

        found = client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                return client.create_experiment(self.experiment)
            except MlflowException:
                found = client.get_experiment_by_name(self.experiment)  # created meanwhile
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            raise MonitoringError(
                f"the MLflow experiment {self.experiment!r} is deleted in {self.tracking_uri}: "
                "restore it (mlflow experiments restore) or choose another "
                "monitoring.loggers[mlflow].experiment"
            )
        return str(found.experiment_id)

    def _reopen(self, client: MlflowClient, run_id: str) -> None:
        """Mark the saved run RUNNING again and continue it."""
        from mlflow.exceptions import MlflowException

        try:
            found = client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise MonitoringError(
                f"the MLflow run {run_id} of this run folder is not in {self.tracking_uri}: "
                "set monitoring.loggers[mlflow].tracking_uri back to the store it was created "
                "in, or remove the mlflow entry of <run>/monitoring.json to start a new run"
            ) from None
        client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self.experiment_id = found.info.experiment_id
