"""``Monitor``: the one object the Trainer reports to; it fans each call out to the loggers.

The Trainer calls, on rank 0 (every call is a no-op where ``enabled=False``)::

    monitor.start(name, start_step, hparams)   # reads <run>/monitoring.json
    monitor.log(metrics, step)                 # every report; rewrites monitoring.json
    monitor.finish()

A logger that raises (its package missing, its server unreachable, its disk full) costs one
warning, naming it, the error and what to check, and is switched off for the rest of the run:
training goes on, and ``metrics.jsonl`` keeps every point.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apt.core.config.monitoring import EXTRAS, MonitoringConfig
from apt.core.redact import redact, redact_mapping
from apt.trainops.monitoring.base import MetricLogger, RunInfo
from apt.trainops.monitoring.jsonl import FILE_NAME, JsonlLogger
from apt.trainops.monitoring.registry import build_logger
from apt.trainops.monitoring.state_file import STATE_FILE, read_state, write_state

__all__ = ["Monitor", "build_monitor"]

log = logging.getLogger("apt")

_MAX_ERROR_CHARS = 600


@dataclass
class _Slot:
    """One logger and what the Monitor knows of it."""

    logger: MetricLogger
    # Steps up to this one were sent by an earlier process (loggers that cannot delete).
    sent_through: int | None = None
    last_step: int | None = None
    active: bool = True

    def holds(self, step: int) -> bool:
        """An earlier process already sent ``step`` to this logger, which cannot delete it."""
        return (
            not self.logger.can_delete
            and self.sent_through is not None
            and step <= self.sent_through
        )


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` as plain JSON values (mappings, lists, text, numbers, booleans, None): a
    ``Path`` or an enum becomes its text and a tuple a list, so every backend can write it."""
    plain: dict[str, Any] = json.loads(json.dumps(params, default=str))
    return plain


def _error_text(exc: BaseException) -> str:
    """``Type: message`` on one line, secrets hidden, cut to a readable length."""
    text = redact(" ".join(f"{type(exc).__name__}: {exc}".split()))
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


class Monitor:
    """Sends the run's metrics to every logger, keeping each one's steps monotonic.

    Args:
        loggers: the loggers, one per kind (:func:`build_monitor` puts metrics.jsonl first).
        run_dir: the run folder; ``monitoring.json`` is kept there.
        enabled: False on every rank but 0: each call does nothing.

    Raises:
        ValueError: two loggers of one kind.
    """

    def __init__(self, loggers: list[MetricLogger], *, run_dir: Path, enabled: bool = True) -> None:
        kinds = [logger.kind for logger in loggers]
        twice = sorted({k for k in kinds if kinds.count(k) > 1})
        if twice:
            raise ValueError(f"one logger per kind; given several of: {', '.join(twice)}")
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._slots = {logger.kind: _Slot(logger) for logger in loggers}
        self._state: dict[str, dict[str, Any]] = {}
        self._started = False
        self._finished = False
        self._state_warned = False

    @property
    def state_path(self) -> Path:
        """``<run>/monitoring.json``."""
        return self.run_dir / STATE_FILE

    @property
    def active(self) -> list[str]:
        """The kinds of the loggers still on, in order."""
        return [kind for kind, slot in self._slots.items() if slot.active]

    def start(self, name: str, start_step: int, hparams: dict[str, Any]) -> None:
        """Start every logger with its saved state; a logger that starts a new run of its
        store (nothing saved for it) also gets the config, redacted, once.

        Args:
            name: the experiment name.
            start_step: 0 for a new run, the resumed checkpoint's step otherwise.
            hparams: the resolved config, a nested mapping (secrets are hidden here, and
                values that are not JSON become their text).

        Raises:
            RuntimeError: called twice.
        """
        if not self.enabled:
            return
        if self._started:
            raise RuntimeError("Monitor.start() called twice")
        self._started = True
        self._state = read_state(self.state_path)
        redacted = redact_mapping(_plain(hparams))
        for kind, slot in self._slots.items():
            saved = dict(self._state.get(kind, {}))
            last = saved.pop("last_step", None)
            last = last if isinstance(last, int) else None
            if slot.logger.can_delete:
                slot.last_step = None if last is None else min(last, start_step)
            else:
                slot.sent_through = slot.last_step = last
            run = RunInfo(run_dir=self.run_dir, name=name, start_step=start_step, saved=saved)
            if self._call(slot, "start", slot.logger.start, run) and kind not in self._state:
                self._call(slot, "log_hparams", slot.logger.log_hparams, redacted)
        self._save()

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Send ``metrics`` of ``step`` to every logger on, except to a logger that cannot
        delete points a step that an earlier process already sent it; then save the state.

        Raises:
            RuntimeError: called before :meth:`start` or after :meth:`finish`.
        """
        if not self.enabled or not metrics:
            return
        if not self._started or self._finished:
            raise RuntimeError("Monitor.log() called outside start() ... finish()")
        for slot in self._slots.values():
            if not slot.active or slot.holds(step):
                continue
            if self._call(slot, "log", slot.logger.log, metrics, step):
                slot.last_step = step if slot.last_step is None else max(slot.last_step, step)
        self._save()

    def finish(self) -> None:
        """Finish every logger on and save the state; later calls do nothing."""
        if not self.enabled or not self._started or self._finished:
            return
        self._finished = True
        for slot in self._slots.values():
            if slot.active:
                self._call(slot, "finish", slot.logger.finish)
        self._save()

    def _call(self, slot: _Slot, phase: str, method: Callable[..., Any], *args: Any) -> bool:
        """Run one logger method; on any error warn once and switch the logger off."""
        try:
            method(*args)
        except Exception as exc:
            self._switch_off(slot, phase, exc)
            return False
        return True

    def _switch_off(self, slot: _Slot, phase: str, exc: Exception) -> None:
        slot.active = False
        kind = slot.logger.kind
        fix = slot.logger.fix
        if isinstance(exc, ImportError) and kind in EXTRAS:
            fix = f'pip install "apt-transformer[{EXTRAS[kind][1]}]"'
        keeps = (
            "metrics.jsonl keeps every point"
            if kind != "jsonl" and "jsonl" in self.active
            else "the other loggers go on"
        )
        log.warning(
            "monitoring: the %s logger failed in %s and is off for the rest of the run (%s): "
            "%s. To fix: %s",
            kind,
            phase,
            keeps,
            _error_text(exc),
            fix,
        )

    def _save(self) -> None:
        """Rewrite monitoring.json: the state and last step of each logger still on; the
        entries of the others stay as they were, so a later run can still continue them."""
        for kind, slot in self._slots.items():
            if not slot.active:
                continue
            try:
                entry = dict(slot.logger.state_dict())
            except Exception as exc:
                self._switch_off(slot, "state_dict", exc)
                continue
            if slot.last_step is not None:
                entry["last_step"] = slot.last_step
            self._state[kind] = entry
        try:
            write_state(self.state_path, self._state)
        except OSError as exc:
            if not self._state_warned:
                self._state_warned = True
                log.warning(
                    "monitoring: cannot write %s (%s); a resumed run will start new W&B and "
                    "MLflow runs. Check that the run folder is writable and its disk not full",
                    self.state_path,
                    _error_text(exc),
                )


def build_monitor(
    cfg: MonitoringConfig, *, run_dir: Path, output_dir: Path, enabled: bool
) -> Monitor:
    """The Monitor of ``cfg.loggers``: ``<run>/metrics.jsonl`` first, always, then each
    configured logger in order (a listed ``jsonl`` adds nothing).

    Args:
        cfg: the ``monitoring`` section.
        run_dir: the run folder.
        output_dir: ``artifacts.output_dir``.
        enabled: False on every rank but 0 (no logger is built there).

    Raises:
        ConfigError: an entry of a kind no logger is registered under.
    """
    run_dir = Path(run_dir)
    if not enabled:
        return Monitor([], run_dir=run_dir, enabled=False)
    loggers: list[MetricLogger] = [JsonlLogger(run_dir / FILE_NAME)]
    loggers += [
        build_logger(entry, output_dir=Path(output_dir))
        for entry in cfg.loggers
        if entry.kind != "jsonl"
    ]
    return Monitor(loggers, run_dir=run_dir)
