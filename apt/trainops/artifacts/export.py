"""Exporting a model: ``save_pretrained`` (APT models) or one safetensors file, all or nothing.

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
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from apt.core.files import apply_umask
from apt.trainops.artifacts.errors import ExportError
from apt.trainops.checkpoints.errors import human_bytes
from apt.trainops.checkpoints.faults import fault_armed

__all__ = ["EXPORT_FAULT", "write_model"]

EXPORT_FAULT = "enospc_on_export"
_OS_ERROR = re.compile(r"os error (\d+)")  # how safetensors reports an I/O failure


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
