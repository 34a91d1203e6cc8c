"""Probe: APT's ``standard`` training with each attention kernel PyTorch offers on this GPU.

APT calls ``F.scaled_dot_product_attention`` and lets PyTorch pick (cuDNN for bf16 on Hopper);
FlexAttention serves packed documents. This probe pins the kernel of every causal attention
call for one APT run of ``gpu_throughput.py`` each (``sdpa_kernel`` inside the forward, traced
into the compiled graph; ``flex`` swaps in FlexAttention with a causal block mask). ``MODES``,
the first argument, names the kernel of each APT run in order, so every run after the default
one needs a ``--lever`` (any harmless override). Turn inductor's graph caches off, or a cached
graph with another kernel may be reused:

    TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0 \
    python benchmarks/probes/attention_kernels.py auto,flash,efficient,flex --profile-steps 3 \
        --lever model.dropout=0.0 --lever model.dropout=0.0 --lever model.dropout=0.0
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu_throughput

from apt.model.layers import attention

_PINNED = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


@cache
def _causal_block_mask(T: int, device: str) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, q, k: q >= k, None, None, T, T, device=device)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_: Any) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=_causal_block_mask(q.shape[2], str(q.device)))


def _pinned(backend: SDPBackend) -> Callable[..., torch.Tensor]:
    def attend(*args: Any, **kwargs: Any) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(*args, **kwargs)

    return attend


def main() -> None:
    modes = sys.argv.pop(1).split(",")
    if not set(modes) <= {"auto", "flex", *_PINNED}:
        raise SystemExit(f"modes are auto, flex, {', '.join(_PINNED)}; got {modes}")
    measure = gpu_throughput.apt_run
    runs = iter(modes)

    def apt_run(args: argparse.Namespace, batches: list, lever: list[str]) -> dict[str, Any]:
        mode = next(runs)
        torch._dynamo.reset()  # a new kernel is a new graph
        sdpa = _flex if mode == "flex" else _pinned(_PINNED[mode]) if mode in _PINNED else None
        functional = SimpleNamespace(**vars(F))
        if sdpa is not None:
            functional.scaled_dot_product_attention = sdpa
        attention.F = functional  # type: ignore[assignment]
        row = measure(args, batches, lever)
        row["run"] = f"APT attention={mode}"
        return row

    gpu_throughput.apt_run = apt_run
    gpu_throughput.main()


if __name__ == "__main__":
    main()
