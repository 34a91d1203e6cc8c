"""Which checkpoints to keep: the union of three pools, and always the newest.

* last: the ``keep_last_n`` most recently committed;
* best: the ``keep_best_n`` best by ``best_metric`` (``best_mode`` min or max) among those whose
  manifest has a finite value for it; ties go to the newer;
* milestones: every step that is a multiple of ``milestone_interval``, forever.

The newest commit is always kept (so the newest good and the only checkpoint are never deleted).
The rule is a pure function of the manifests, so it is tested without touching a disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["CheckpointInfo", "RetentionPolicy", "select_kept"]


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint as its manifest describes it (not verified).

    Attributes:
        step: the training step.
        path: its folder.
        sequence: commit order in this save_dir (higher is newer).
        metrics: the metrics saved with it.
        created: ISO-8601 UTC time of the commit.
    """

    step: int
    path: Path
    sequence: int
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    @property
    def name(self) -> str:
        """The folder name (``step-000001200``)."""
        return self.path.name


@dataclass(frozen=True)
class RetentionPolicy:
    """The retention fields of :class:`~apt.core.config.CheckpointConfig`."""

    keep_last_n: int
    keep_best_n: int = 0
    best_metric: str = "val_loss"
    best_mode: Literal["min", "max"] = "min"
    milestone_interval: int | None = None


def _metric(info: CheckpointInfo, name: str) -> float | None:
    value = info.metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def select_kept(infos: list[CheckpointInfo], policy: RetentionPolicy) -> set[Path]:
    """The folders to keep; every other folder in ``infos`` may be deleted."""
    if not infos:
        return set()
    by_age = sorted(infos, key=lambda i: (i.sequence, i.step), reverse=True)
    kept = {by_age[0].path}
    kept |= {i.path for i in by_age[: policy.keep_last_n]}
    if policy.keep_best_n:
        scored = [(v, i) for i in by_age if (v := _metric(i, policy.best_metric)) is not None]
        sign = 1.0 if policy.best_mode == "min" else -1.0
        # sorted() is stable and by_age is newest first, so ties keep the newer checkpoint
        scored.sort(key=lambda pair: sign * pair[0])
        kept |= {i.path for _, i in scored[: policy.keep_best_n]}
    if policy.milestone_interval:
        kept |= {i.path for i in infos if i.step % policy.milestone_interval == 0}
    return kept
