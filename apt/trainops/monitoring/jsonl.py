"""``<run>/metrics.jsonl``: one strict-JSON object per report, always written.

Each line is ``{"step": 20, "time": 1718000000.123, "train_loss": 2.341, ...}``; a NaN or
infinite value is written as ``null`` so every line stays strict JSON, and each line is flushed
as it is written, so a killed run loses none. A resumed run first rewrites the file keeping the
records up to its checkpoint's step: the steps after it are trained, and logged, again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import IO, Any

from apt.trainops.monitoring.base import MetricLogger, RunInfo

__all__ = ["JsonlLogger", "read_jsonl", "write_record"]

log = logging.getLogger("apt")

FILE_NAME = "metrics.jsonl"


def _finite_or_none(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def write_record(stream: IO[str], metrics: dict[str, Any], step: int) -> None:
    """Append ``{"step", "time", **metrics}`` to ``stream`` as one strict-JSON line and flush it
    (the one writer of the ``metrics.jsonl`` format)."""
    record = _finite_or_none({"step": step, "time": round(time.time(), 3), **metrics})
    stream.write(json.dumps(record, allow_nan=False) + "\n")
    stream.flush()


def _parse_line(line: str) -> dict[str, Any] | None:
    """The record of one line, or None when it is not a JSON object with an integer step."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a ``metrics.jsonl`` file, in file order (``[]`` when it is missing).

    A line that is not a JSON object with an integer ``step`` (the half-written last line of
    a killed run) is left out.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [record for line in lines if (record := _parse_line(line)) is not None]


def _drop_after(path: Path, step: int) -> None:
    """Rewrite ``path`` atomically with only its records of steps ``<= step``, dropping a
    half-written last line; a line that cannot be read elsewhere is dropped with a warning."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    torn_tail = bool(text) and not text.endswith("\n")
    kept: list[str] = []
    unreadable: list[int] = []
    for number, line in enumerate(lines, start=1):
        record = _parse_line(line)
        if record is None:
            if line.strip() and not (torn_tail and number == len(lines)):
                unreadable.append(number)
        elif record["step"] <= step:
            kept.append(line)
    if unreadable:
        log.warning(
            "%s: dropped %d unreadable line(s) (the first is line %d) while keeping the records "
            "up to step %d",
            path,
            len(unreadable),
            unreadable[0],
            step,
        )
    if len(kept) == len(lines) and not torn_tail:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


class JsonlLogger(MetricLogger):
    """Appends one JSON line per report to ``metrics.jsonl`` (the run's own record).

    Args:
        path: the file (None: ``<run>/metrics.jsonl``).
    """

    kind = "jsonl"
    can_delete = True
    fix = "check that the run folder is writable and its disk is not full"

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._file: IO[str] | None = None

    @classmethod
    def from_config(cls, cfg: Any, *, output_dir: Path) -> JsonlLogger:
        """``<run>/metrics.jsonl``; the entry has no options."""
        return cls()

    def start(self, run: RunInfo) -> None:
        """Keep the records up to ``run.start_step`` and open the file for appending.

        Raises:
            OSError: the file cannot be read or written.
        """
        self.path = self.path or run.run_dir / FILE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _drop_after(self.path, run.start_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- open for the run

    def log_hparams(self, params: dict[str, Any]) -> None:
        """The config is in ``<run>/config.yaml``, not in the metric log."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Append ``{"step", "time", **metrics}`` as one flushed line (nothing when empty)."""
        if not metrics:
            return
        if self._file is None:
            raise RuntimeError("JsonlLogger.log() called before start()")
        write_record(self._file, metrics, step)

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
