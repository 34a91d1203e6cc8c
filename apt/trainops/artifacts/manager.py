"""The run folder: its lock, resolved config, provenance, environment, metric log, log file,
plots and exported model."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from apt.core.config import ArtifactsConfig
from apt.core.errors import ConfigError
from apt.core.logs import RunFileHandler, attach_file_log, detach_file_log
from apt.core.redact import redact, redact_mapping
from apt.model.store import ModelStore
from apt.model.tokenizers import Tokenizer, save_tokenizer
from apt.trainops.artifacts.environment import describe_environment
from apt.trainops.artifacts.errors import RunFolderError
from apt.trainops.artifacts.export import describe_run, write_model
from apt.trainops.artifacts.plots import write_plots
from apt.trainops.artifacts.run_lock import RunLock
from apt.trainops.monitoring.jsonl import write_record

__all__ = ["LOG_FILE", "ArtifactManager", "check_folder_name", "is_inside"]

log = logging.getLogger("apt")

#: The run's log file, inside the run folder.
LOG_FILE = Path("logs") / "train.log"


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """``path`` is ``folder`` or below it (absolute paths compared; symlinks not followed)."""
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))


def check_folder_name(name: str) -> str:
    """``name`` when it is one path component (a folder name), else a ConfigError.

    ``..``, ``a/b`` or an absolute path would put the run folder outside ``output_dir`` (and
    ``--new-run`` would move whatever it names); ``.`` is ``output_dir`` itself. The same rule as
    the schema's, checked again here for managers built from keywords.
    """
    if (
        name in ("", ".", "..")
        or any(c in name for c in ("/", "\\", os.sep))
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    ):
        raise ConfigError(
            f"artifacts.experiment_name: {name!r} is not a folder name. It names the run folder "
            "<output_dir>/<experiment_name>, so it must be one path component: no / or \\, "
            "not . or .., no control characters (e.g. 'gpt_small_v2'); to put runs elsewhere, "
            "set artifacts.output_dir."
        )
    return name


def _file_name(name: str) -> str:
    """``name`` when it is one file name (``train.log``), else a ValueError."""
    if name in ("", ".", "..") or any(c in name for c in ("/", "\\", os.sep)):
        raise ValueError(f"{name!r} is not a file name: give one name, like 'train.log'")
    return name


def _number(key: str, value: Any) -> Any:
    """A metric's value as JSON: a number (a 0-d tensor or NumPy scalar becomes a float),
    a boolean or None; anything else is a TypeError naming ``key``."""
    if value is None or isinstance(value, bool | int | float):
        return value
    refused = TypeError(
        f"metric {key!r}: metrics.jsonl holds numbers only, got {type(value).__name__}; "
        "log text with logging.getLogger('apt') (it goes to logs/train.log)"
    )
    if isinstance(value, str | bytes):
        raise refused
    try:
        return float(value)  # a 0-d tensor, a NumPy scalar
    except (TypeError, ValueError, RuntimeError):
        raise refused from None


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) as None: ``metrics.jsonl`` is JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class ArtifactManager:
    """Owns ``<output_dir>/<experiment_name>/``; only the main process writes.

    Files: ``.lock`` (while a run holds the folder: :mod:`~apt.trainops.artifacts.run_lock`),
    ``config.yaml`` (the resolved config), ``provenance.json`` (where each value came from),
    ``env.json`` (:func:`~apt.trainops.artifacts.environment.describe_environment`),
    ``metrics.jsonl`` (one JSON object per logged step; NaN and inf are written as null),
    ``logs/train.log`` (the ``apt`` logger's lines), ``plots/`` (loss and learning rate),
    ``final_model/``; :meth:`save_model` also stores a model by name in the local model store.
    Each method works on its own, without :meth:`lock` (a script or test
    that only wants the files); the Trainer takes the lock first.

    Secrets are never written: the config and provenance pass through
    :func:`~apt.core.redact.redact_mapping` (the value of a key named like a secret, ``api_key``,
    ``hf_token``, ``db_password``, becomes ``***``, and so does a URI's password or a
    ``token=...`` parameter in any string), ``env.json`` keeps only the variables that matter
    for reproducing the run, redacted the same way, every log line passes through
    :func:`~apt.core.redact.redact`, and ``metrics.jsonl`` holds numbers only.

    Args:
        cfg: the ``artifacts`` section (or pass ``output_dir``/``experiment_name``).
        is_main: False on every rank but 0: nothing is written.

    Raises:
        ConfigError: ``experiment_name`` is not a single folder name.
    """

    def __init__(
        self,
        cfg: ArtifactsConfig | None = None,
        *,
        output_dir: str | Path | None = None,
        experiment_name: str | None = None,
        is_main: bool = True,
    ) -> None:
        cfg = cfg or ArtifactsConfig.model_validate({})
        self.cfg = cfg
        self.output_dir = Path(output_dir or cfg.output_dir)
        self.run_dir = self.output_dir / check_folder_name(experiment_name or cfg.experiment_name)
        self.is_main = is_main
        self._metrics_file: Any = None
        self._log_handler: RunFileHandler | None = None
        self._lock: RunLock | None = None
        self._ckpt_lock: RunLock | None = None  # a checkpoint folder outside the run folder

    def prepare(self) -> Path:
        """Create the run folder (idempotent) and return it.

        Raises:
            RunFolderError: it cannot be created (``output_dir`` is a file, permission denied).
        """
        if self.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise self._unusable(exc) from None
        return self.run_dir

    def lock(self, *, checkpoints: Path | None = None) -> None:
        """Create the run folder and take its lock, held until :meth:`unlock` (main process;
        a no-op when held already). Take it before anything else touches the folder.

        Args:
            checkpoints: the run's checkpoint folder; locked as well when it is outside the
                run folder, since two runs must not share one either.

        Raises:
            RunLockedError: another live process holds it (named, with what to do).
            RunFolderError: a folder cannot be created or written.
        """
        if not self.is_main:
            return
        self.prepare()
        self._lock = self._lock or RunLock(self.run_dir)
        try:
            self._lock.acquire()
        except OSError as exc:
            raise self._unusable(exc) from None
        if checkpoints is None or is_inside(checkpoints, self.run_dir):
            return
        self._ckpt_lock = self._ckpt_lock or RunLock(
            checkpoints, what="checkpoint folder", key="training.checkpoints.directory"
        )
        try:
            checkpoints.mkdir(parents=True, exist_ok=True)
            self._ckpt_lock.acquire()
        except BaseException as exc:
            self.unlock()
            if isinstance(exc, OSError):
                raise RunFolderError(
                    f"training.checkpoints.directory: cannot use {checkpoints.absolute()}: "
                    f"{exc.strerror} ({exc.filename}). Choose a folder you can write, or leave "
                    "the key unset for <run folder>/checkpoints."
                ) from None
            raise

    def unlock(self) -> None:
        """Release the locks :meth:`lock` took (each removes its ``.lock``); a no-op when none
        is held."""
        for held in (self._ckpt_lock, self._lock):
            if held is not None:
                held.release()

    @property
    def locked(self) -> bool:
        """This manager holds the run folder's lock."""
        return self._lock is not None and self._lock.held

    def mark_busy(self, busy: bool) -> None:
        """Whether the run is training: an idle holder hands its locks to another manager of
        the same folders in this process; a busy one refuses it."""
        for held in (self._ckpt_lock, self._lock):
            if held is not None:
                held.busy = busy

    def archive_existing(self) -> Path | None:
        """Move an existing run folder aside as ``<name>-<YYYYmmdd-HHMMSS>``; return its new
        path (None when there was nothing to move). Only the run folder itself ever moves.
        When the lock is held, it is held on the new, empty run folder afterwards.

        Raises:
            RunLockedError: another process took the new run folder in the moment between.
        """
        if not self.is_main or not self.run_dir.exists():
            return None
        run = Path(os.path.abspath(self.run_dir))
        assert run.parent == Path(os.path.abspath(self.output_dir)), (run, self.output_dir)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.run_dir.with_name(f"{self.run_dir.name}-{stamp}")
        n = 1
        while target.exists():  # two new runs within one second
            n += 1
            target = self.run_dir.with_name(f"{self.run_dir.name}-{stamp}-{n}")
        log_file = self._log_handler is not None
        if log_file:  # the open file would follow the old run into the archive
            self._detach_log_file()
        self.run_dir.rename(target)
        old = self._lock
        if old is not None and old.held:
            old.follow(target)
            self._lock = None
            try:
                self.lock()
            finally:
                old.release()  # removes the archived folder's .lock
        if log_file:
            self.attach_log_file()
        return target

    def save_config(self, config: dict[str, Any], provenance: dict[str, str] | None = None) -> None:
        """Write the resolved config as ``config.yaml`` (and where its values came from as
        ``provenance.json``), both redacted: the value of a secret-named key is written as
        ``***``, and so is a URI's password or a ``token=...`` parameter in any string, in
        the config and in provenance (which names ``--set`` overrides) alike.

        Raises:
            RunFolderError: the run folder cannot be created.
        """
        if not self.is_main:
            return
        self._write_text("config.yaml", yaml.safe_dump(redact_mapping(config), sort_keys=False))
        if provenance is not None:
            self._write_text(
                "provenance.json", json.dumps(redact_mapping(provenance), indent=2, sort_keys=True)
            )

    def save_tokenizer(self, tokenizer: Tokenizer) -> Path | None:
        """Write the run's tokenizer into ``<run>/tokenizer/`` (rewritten at each start, so an
        interrupted write is repaired by the next one); ``from_pretrained``-style loading:
        :func:`apt.model.tokenizers.load_tokenizer`. Returns the folder (None on other ranks).

        Raises:
            RunFolderError: the run folder cannot be written.
        """
        if not self.is_main:
            return None
        self.prepare()
        try:
            return save_tokenizer(tokenizer, self.run_dir / "tokenizer")
        except OSError as exc:
            raise self._unusable(exc) from None

    def save_environment(self, extra: dict[str, Any] | None = None) -> Path | None:
        """Write ``env.json``: what the run runs on
        (:func:`~apt.trainops.artifacts.environment.describe_environment`), with ``extra``'s
        entries on top (the Trainer's world size, device); redacted like :meth:`save_config`.
        Replaced whole at each start, so it describes the latest one. Returns its path (None
        on other ranks).

        Raises:
            RunFolderError: the run folder cannot be created.
        """
        if not self.is_main:
            return None
        described = redact_mapping(_json_safe({**describe_environment(), **(extra or {})}))
        self._write_text("env.json", json.dumps(described, indent=2, default=str) + "\n")
        return self.run_dir / "env.json"

    def attach_log_file(self) -> Path | None:
        """Append the ``apt`` logger's lines to ``logs/train.log`` (timestamped, redacted;
        kept across resumes) until :meth:`close`. Main process only: returns the file, or None
        on other ranks; a no-op when attached already.

        Raises:
            RunFolderError: the file cannot be created.
        """
        if not self.is_main:
            return None
        if self._log_handler is None:
            self.prepare()
            try:
                self._log_handler = attach_file_log(self.run_dir / LOG_FILE)
            except OSError as exc:
                raise self._unusable(exc) from None
        return Path(self._log_handler.baseFilename)

    def save_plots(self) -> list[Path]:
        """Draw ``plots/loss.png`` and ``plots/lr.png`` from ``metrics.jsonl``
        (:func:`~apt.trainops.artifacts.plots.write_plots`); return the files written.

        Without matplotlib one INFO line says how to install it; a plot that cannot be written
        (a full disk) is a warning, not an error: the run's other files are what matter.
        """
        if not self.is_main:
            return []
        try:
            return write_plots(self.run_dir / "metrics.jsonl", self.run_dir / "plots")
        except OSError as exc:
            log.warning(
                "plots/ not written: %s (%s)", exc.strerror or exc, exc.filename or self.run_dir
            )
            return []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Append one line to ``metrics.jsonl`` (a NaN or infinite value is written as null,
        so every line stays strict JSON).

        Raises:
            TypeError: a value is not a number (text belongs in the log, not the metrics).
        """
        if not self.is_main or not metrics:
            return
        values = {key: _number(key, value) for key, value in metrics.items()}
        if self._metrics_file is None:
            self.prepare()
            self._metrics_file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        write_record(self._metrics_file, values, step)

    # Seed-compatible name.
    def save_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Alias of :meth:`log_metrics`."""
        self.log_metrics(metrics, step)

    def save_logs(self, lines: list[str], name: str = "train.log") -> Path | None:
        """Append free-form lines, each redacted, to ``logs/<name>``; return the file (None on
        other ranks). Appending keeps the lines of :meth:`attach_log_file` in the same file.

        Raises:
            ValueError: ``name`` is not a single file name.
            RunFolderError: the file cannot be written.
        """
        path = self.run_dir / "logs" / _file_name(name)
        if not self.is_main:
            return None
        self.prepare()
        try:
            path.parent.mkdir(exist_ok=True)
            with open(path, "a", encoding="utf-8") as file:
                file.writelines(redact(line).rstrip("\n") + "\n" for line in lines)
        except OSError as exc:
            raise self._unusable(exc) from None
        return path

    def save_model(
        self,
        model: nn.Module,
        directory: str | Path | None = None,
        *,
        name: str | None = None,
        store: ModelStore | str | Path | None = None,
        overwrite: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
        step: int | None = None,
    ) -> Path:
        """Export ``model`` into the run folder, or by name into the local model store.

        ``directory`` (default ``final_model`` when no ``name`` is given) is written with
        ``save_pretrained`` (APT models) or as a safetensors file, all or nothing
        (:func:`~apt.trainops.artifacts.export.write_model`). ``name`` stores the model in the
        local model store (:class:`~apt.model.store.ModelStore`) with a model card from what
        the run folder holds (:func:`~apt.trainops.artifacts.export.describe_run`); with both,
        both are written.

        Args:
            model: the (unwrapped) model.
            directory: folder inside the run folder, or an absolute/relative path of its own.
            name: the model's name in the store (an APT model only).
            store: the store or its folder (default: ``$APT_HOME``, else ``~/.cache/apt/models``).
            overwrite: replace a model the store holds under ``name``.
            state_dict: weights to write instead of the module's own (gathered from shards).
            step: the training step exported (named in error messages, written on the card).

        Returns:
            The stored model's folder when ``name`` is given, else the exported folder.

        Raises:
            ExportError: the files could not be written (disk full, permission denied); the
                target folder is left as it was.
            ModelStoreError: ``name`` is invalid or taken (without ``overwrite``), the model is
                not an APT model, or the store could not be written.
        """
        if name is None:
            target = self.run_dir / (directory if directory is not None else "final_model")
            if not self.is_main:
                return target
            return write_model(model, target, state_dict=state_dict, step=step)
        models = ModelStore.of(store)
        stored = models.path(name)  # an invalid name fails on every rank alike
        if not self.is_main:
            return stored
        if directory is not None:
            write_model(model, self.run_dir / directory, state_dict=state_dict, step=step)
        if self._metrics_file is not None:
            self._metrics_file.flush()  # the card reads the newest metrics
        return models.save(
            name,
            model,  # type: ignore[arg-type]  # save refuses what is not an APT model
            overwrite=overwrite,
            state_dict=state_dict,
            source=self.run_dir.absolute(),
            training=describe_run(self.run_dir, step=step),
        )

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every record of ``metrics.jsonl`` (for tests and reports)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        """Close the metric log and detach the log file (:meth:`attach_log_file`); a later
        call of either opens it again."""
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        self._detach_log_file()

    def _detach_log_file(self) -> None:
        if self._log_handler is not None:
            detach_file_log(self._log_handler)
            self._log_handler = None

    def _write_text(self, name: str, text: str) -> None:
        self.prepare()
        tmp = self.run_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.run_dir / name)

    def _unusable(self, exc: OSError) -> RunFolderError:
        """The message for a run folder that cannot be created or written, naming the key."""
        out, run = self.output_dir.absolute(), self.run_dir.absolute()
        files = [p for p in (run, out, *out.parents) if p.exists() and not p.is_dir()]
        if files and files[0] == run:
            return RunFolderError(
                f"artifacts.experiment_name: {run} is a file, not a run folder. Remove or "
                "rename it, or choose another artifacts.experiment_name."
            )
        if files:
            where = "is a file" if files[0] == out else f"cannot be created: {files[0]} is a file"
            return RunFolderError(
                f"artifacts.output_dir: {out} {where}, not a folder. Set artifacts.output_dir "
                "to a folder (it is created when missing)."
            )
        reason = "permission denied" if isinstance(exc, PermissionError) else exc.strerror
        return RunFolderError(
            f"artifacts.output_dir: cannot write the run folder {run}: {reason} "
            f"({exc.filename or run}). Choose a folder you can write (--set "
            "artifacts.output_dir=PATH), or fix its permissions."
        )
