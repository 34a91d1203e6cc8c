"""``plots/``: the loss and learning-rate curves of a run, drawn from ``metrics.jsonl``.

``loss.png`` shows ``train_loss`` and ``val_loss`` against the step, ``lr.png`` the learning
rate (``lr``, and ``lr/group_<i>`` when a callback logs each parameter group). A resumed run
logs again the steps it trains a second time; each curve takes the latest value logged at each
step, so it shows the run as its checkpoints continued it.

matplotlib (``pip install "apt-transformer[plots]"``) is imported here only, when the plots are
drawn, and drawn on an Agg canvas of its own: pyplot and the application's backend (a notebook's
inline one) are left alone. Without it the plots are skipped with one INFO line.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from apt.trainops.monitoring.jsonl import read_jsonl

__all__ = ["PLOTS_SKIPPED", "read_series", "write_plots"]

log = logging.getLogger("apt")

#: The line logged when matplotlib is not installed.
PLOTS_SKIPPED = 'plots/ skipped: pip install "apt-transformer[plots]"'

# (file, y-axis label, the metrics it shows by name, and by prefix)
_FIGURES = (
    ("loss.png", "loss", ("train_loss", "val_loss"), ()),
    ("lr.png", "learning rate", ("lr",), ("lr/",)),
)


def read_series(metrics_file: Path) -> dict[str, dict[int, float]]:
    """metric -> step -> the latest finite number logged for it at that step.

    Lines that are not JSON objects with an integer ``step`` (the last line of a killed run,
    cut short) are skipped, and so are nulls (NaN and inf are written as null) and values that
    are not numbers.
    """
    series: dict[str, dict[int, float]] = {}
    for record in read_jsonl(metrics_file):
        step = record["step"]
        for key, value in record.items():
            if key in ("step", "time") or isinstance(value, bool):
                continue
            if isinstance(value, int | float) and math.isfinite(value):
                series.setdefault(key, {})[step] = float(value)
    return series


def write_plots(metrics_file: Path, folder: Path) -> list[Path]:
    """Draw ``loss.png`` and ``lr.png`` (each that has data) into ``folder``; return the files
    written (each replaced whole: written beside its name, then moved there).

    Returns an empty list, after one INFO line, when matplotlib is missing, and without a
    line when ``metrics_file`` holds none of the metrics.

    Raises:
        OSError: ``folder`` or a file in it cannot be written.
    """
    series = read_series(metrics_file)
    figures = []
    for name, label, names, prefixes in _FIGURES:
        shown = [k for k in sorted(series) if k in names or k.startswith(prefixes)]
        if shown:
            figures.append((name, label, shown))
    if not figures:
        return []
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.info(PLOTS_SKIPPED)
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, label, shown in figures:
        figure = Figure(figsize=(8, 4.5), dpi=100, layout="tight")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for key in shown:
            steps = sorted(series[key])
            few = len(steps) < 30  # evaluations: show each one
            values = [series[key][s] for s in steps]
            axes.plot(steps, values, label=key, marker="o" if few else None, markersize=3)
        axes.set_xlabel("step")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend()
        target = folder / name
        staging = folder / f".{name}.tmp"
        try:
            figure.savefig(staging, format="png")
            os.replace(staging, target)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        written.append(target)
    return written
