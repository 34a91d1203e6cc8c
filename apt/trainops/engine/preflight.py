"""Checks a run makes before it builds anything heavy: every rank has the same config, and a
run meant for GPUs says so when it is about to train on a CPU."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from apt.core.config import APTConfig, TrainingConfig
from apt.core.errors import ConfigError

__all__ = ["check_ranks_agree", "warn_if_made_for_gpus"]

log = logging.getLogger("apt")

#: Models from this size up are meant for accelerators: on a CPU they take minutes per step.
GPU_SIZED_PARAMETERS = 50_000_000


def warn_if_made_for_gpus(cfg: TrainingConfig, model: nn.Module, device: torch.device) -> None:
    """Say so when a run configured for GPUs (bf16/fp16, torch.compile, a large model) is
    about to train on the CPU, before the user waits minutes for the first step."""
    if device.type != "cpu":
        return
    params = sum(p.numel() for p in model.parameters())
    reasons = [f"precision {cfg.precision}"] if cfg.precision != "fp32" else []
    reasons += ["torch.compile"] if cfg.compile else []
    reasons += [f"{params / 1e6:.0f}M parameters"] if params >= GPU_SIZED_PARAMETERS else []
    if reasons:
        log.warning(
            "this run is set up for GPUs (%s) but trains on the CPU (no CUDA device found): "
            "expect it to be very slow. For a CPU run use --profile quickstart, or set "
            "training.precision=fp32 and a smaller model.",
            ", ".join(reasons),
        )


def check_ranks_agree(cfg: APTConfig, rank: int) -> None:
    """Every rank must train the same config into the same run folder."""
    import torch.distributed as dist

    mine = (cfg.fingerprint(), f"{cfg.artifacts.output_dir}/{cfg.artifacts.experiment_name}")
    seen: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, mine)
    if any(other != mine for other in seen):
        differing = sorted(
            {f"rank {r}: run folder {s[1]}, config {s[0][:12]}" for r, s in enumerate(seen)}
        )
        raise ConfigError(
            f"rank {rank}: the processes were started with different configs:\n  "
            + "\n  ".join(differing)
            + "\nStart every rank with the same profile and --set overrides."
        )
