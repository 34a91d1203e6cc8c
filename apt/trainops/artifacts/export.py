"""Exporting a model: ``save_pretrained`` (APT models) or one safetensors file, all or nothing;
and what a run folder tells the model card of a model stored by name (:func:`describe_run`).

The files are written into a staging folder beside the target (``.<name>.tmp-<pid>``) and moved
into the target once every one of them is written, so a failed export (a full disk) or a killed
process never leaves a half-written model under the target's name; files of the target that
the export does not write are kept. A failure is an :class:`ExportError` naming the path and
the OS error.

Fault injection (tests only, like the checkpoint save points of
:mod:`apt.trainops.checkpoints.faults`, whose ``APT_FAULT_INJECT`` parser it uses):
``APT_FAULT_INJECT=enospc_on_export`` (or ``enospc_on_export@<step>``) makes the export fail
as a full disk would.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from torch import nn

from apt.core.files import apply_umask
from apt.model.store import TrainingSummary
from apt.trainops.artifacts.errors import ExportError
from apt.trainops.checkpoints.errors import human_bytes
from apt.trainops.checkpoints.faults import fault_armed

__all__ = ["EXPORT_FAULT", "describe_run", "is_run_folder", "write_model"]

EXPORT_FAULT = "enospc_on_export"
_OS_ERROR = re.compile(r"os error (\d+)")  # how safetensors reports an I/O failure
#: Metrics of the machine and the run's speed, not of the model: left off model cards (and so
#: is every ``*_seconds`` one).
_SPEED_METRICS = frozenset(
    {"time", "step", "step_time", "tokens_per_second", "peak_memory_gib", "mfu"}
)


def write_model(
    model: nn.Module,
    target: Path,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    step: int | None = None,
) -> Path:
    """Write ``model`` into the folder ``target`` and return it.

    Raises:
        ExportError: a write failed (disk full, permission denied, ``target`` is a file);
            ``target`` is as it was and no staging folder is left.
    """
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a folder", str(target))
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if step is not None and fault_armed(EXPORT_FAULT, step):
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(staging))
        _write(model, staging, state_dict)
        target.mkdir(exist_ok=True)
        for item in sorted(staging.iterdir()):
            os.replace(item, target / item.name)
        staging.rmdir()
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise _export_error(exc, target, step) from None
    return target


def _write(model: nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
    save_pretrained = getattr(model, "save_pretrained", None)
    if callable(save_pretrained):
        if state_dict is None:
            save_pretrained(folder)
        else:
            save_pretrained(folder, state_dict=state_dict)
        return
    from safetensors.torch import save_file

    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / "model.safetensors"))
    apply_umask(folder / "model.safetensors")


def _export_error(exc: OSError | SafetensorError, target: Path, step: int | None) -> ExportError:
    if isinstance(exc, OSError):
        code, text = exc.errno, f"{exc.strerror or exc} ({exc.filename or target})"
    else:
        match = _OS_ERROR.search(str(exc))
        code, text = (int(match.group(1)) if match else None), str(exc)
    what = "the model" if step is None else f"the model of step {step}"
    disk_full = code in (errno.ENOSPC, errno.EDQUOT)
    if disk_full:
        existing = next(p for p in (target, *target.parents) if p.exists())
        try:
            free = human_bytes(shutil.disk_usage(existing).free)
        except OSError:
            free = "unknown"
        message = (
            f"disk full while exporting {what} to {target}: {text}; {free} free there. {target} "
            "was left as it was. Free space, or set artifacts.output_dir on a larger disk."
        )
    else:
        message = f"could not export {what} to {target}: {text}. {target} was left as it was."
    return ExportError(message, path=target, disk_full=disk_full)


def is_run_folder(folder: Path) -> bool:
    """``folder`` looks like a run folder: it holds ``config.yaml`` or ``metrics.jsonl``."""
    return (folder / "config.yaml").is_file() or (folder / "metrics.jsonl").is_file()


def describe_run(
    run_dir: Path, *, step: int | None = None, checkpoint: Path | None = None
) -> TrainingSummary:
    """What the run folder ``run_dir`` tells a model card, from the files it holds.

    The data source comes from ``config.yaml``; the steps are ``step`` (else the newest step
    in ``metrics.jsonl``); the final metrics are the last value of each metric logged at or
    before that step, less those of the machine's speed (step time, throughput, memory). A
    file that is missing or unreadable leaves its fields empty (None, no metrics): the card
    says what the folder still tells.

    Args:
        run_dir: the run folder.
        step: the step the exported weights are from (a checkpoint's); default: the last.
        checkpoint: the checkpoint folder exported, when not the run's ``final_model``.
    """
    records = _metric_records(run_dir / "metrics.jsonl")
    if step is None:
        step = max((r["step"] for r in records), default=None)
    final: dict[str, Any] = {}
    for record in records:
        if step is None or record["step"] <= step:
            final.update(
                (k, v)
                for k, v in record.items()
                if k not in _SPEED_METRICS and not k.endswith("_seconds")
            )
    return TrainingSummary(
        run=str(run_dir.absolute()),
        data=_describe_data(run_dir / "config.yaml"),
        steps=step,
        final_metrics=final,
        checkpoint=None if checkpoint is None else str(checkpoint.absolute()),
    )


def _metric_records(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` that have a step (a torn last line is skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _describe_data(config_file: Path) -> str | None:
    """``data.source`` of the run's ``config.yaml`` in one line (None when unreadable)."""
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        data = config["data"]
        source = data["source"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
        return None
    if isinstance(source, dict):
        return f"{source.get('kind', '?')}: {source.get('path', '?')}"
    if source == "files":
        files = [str(f) for f in data.get("train_files") or []]
        more = f" and {len(files) - 3} more" if len(files) > 3 else ""
        return f"files: {', '.join(files[:3])}{more}"
    limit = data.get("max_corpus_bytes")
    return f"{source} (first {limit:,} bytes)" if isinstance(limit, int) else str(source)
