"""Mixed precision and determinism: autocast factory, GradScaler, seeding."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["make_autocast", "make_grad_scaler", "seed_everything"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_autocast(
    precision: str, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A zero-argument factory of the autocast context for ``precision`` on ``device``."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = _DTYPES[precision]
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (every device); optionally demand deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible matmuls; it reads this variable when
        # the first handle is created, so it has to be set here, before any CUDA work.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
