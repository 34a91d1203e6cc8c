"""``env.json``: what a run ran on, for reproducing it (software, hardware, code, command).

:func:`describe_environment` gathers it: the Python, platform, torch, CUDA and APT versions,
the GPUs, the git commit of the working directory (and whether tracked files differ from it),
the host, the command line, the world size and rank, and the environment variables that change
how a run trains (:data:`ENV_NAMES`, :data:`ENV_PREFIXES`; no other variable is read).

Nothing secret is kept: every argument and every variable's value passes through
:func:`~apt.core.redact.redact`, a variable whose name says it holds a secret
(:func:`~apt.core.redact.is_secret_name`: ``NCCL_..._TOKEN``) is written as ``***``, and so is
the argument after a secret-named option (``--api-key VALUE``).
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from apt.core.redact import MASK, is_secret_name, redact, redact_mapping
from apt.core.version import __version__

__all__ = ["ENV_NAMES", "ENV_PREFIXES", "GIT_TIMEOUT", "describe_environment"]

#: Environment variables recorded by name: threads, devices, determinism, the launcher's.
ENV_NAMES = frozenset(
    {
        "CUBLAS_WORKSPACE_CONFIG",
        "GROUP_RANK",
        "HF_DATASETS_OFFLINE",
        "HF_HUB_OFFLINE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "MKL_NUM_THREADS",
        "NODE_RANK",
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "PYTHONHASHSEED",
        "RANK",
        "SLURM_JOB_ID",
        "TOKENIZERS_PARALLELISM",
        "TORCHELASTIC_RUN_ID",
        "TRANSFORMERS_OFFLINE",
        "WORLD_SIZE",
    }
)
#: Environment variables recorded by prefix (``CUDA_VISIBLE_DEVICES``, ``NCCL_DEBUG``, ...).
ENV_PREFIXES = ("APT_", "CUDA_", "NCCL_", "PYTORCH_", "TORCH_")
#: Seconds each git command may take (a slow network filesystem must not delay the run).
GIT_TIMEOUT = 2.0


def describe_environment(
    *,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> dict[str, Any]:
    """What this process runs on, redacted, as a JSON-ready mapping (the content of
    ``env.json``). Never raises for a missing git or CUDA: those entries are null or empty.

    Args:
        argv: the command line (default: ``sys.argv``).
        environ: the environment (default: ``os.environ``).
        cwd: the folder whose git repository is described (default: the working directory).

    Returns:
        ``python``, ``platform``, ``hostname``, ``torch``, ``cuda`` (None without CUDA),
        ``gpus`` (device names), ``apt``, ``git`` (``{"commit", "dirty"}`` or None),
        ``command``, ``world_size`` and ``rank`` (None when unset), ``environment``.
    """
    env = os.environ if environ is None else environ
    chosen = {
        name: value
        for name, value in sorted(env.items())
        if name in ENV_NAMES or name.startswith(ENV_PREFIXES)
    }
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": _gpu_names(),
        "apt": __version__,
        "git": _git_state(Path.cwd() if cwd is None else Path(cwd)),
        "command": _redact_argv(sys.argv if argv is None else argv),
        "world_size": _int_or_none(env.get("WORLD_SIZE")),
        "rank": _int_or_none(env.get("RANK")),
        "environment": redact_mapping(chosen),
    }


def _redact_argv(argv: Sequence[str]) -> list[str]:
    """Each argument redacted; the value after a secret-named option (``--hf-token X``)
    hidden whole, since nothing in it says that it is a secret."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        before = argv[i - 1] if i else ""
        secret_value = before.startswith("-") and "=" not in before and is_secret_name(before)
        out.append(MASK if secret_value and not arg.startswith("-") else redact(arg))
    return out


def _gpu_names() -> list[str]:
    try:
        if not torch.cuda.is_available():
            return []
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except (RuntimeError, AssertionError):  # a broken driver: the run reports it elsewhere
        return []


def _git_state(cwd: Path) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the repository holding ``cwd``; None when git is
    missing, ``cwd`` is not in a repository (or one without commits), or git is too slow."""
    commit = _git(cwd, "rev-parse", "HEAD")
    if not commit:
        return None
    status = _git(cwd, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _git(cwd: Path, *args: str) -> str | None:
    """The stripped output of ``git args`` in ``cwd``; None when it fails in any way."""
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT,
            stdin=subprocess.DEVNULL,
            # Reading the state must not take the index lock from the user's own git commands.
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
            check=False,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
