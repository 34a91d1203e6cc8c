"""Every random stream of a process, captured and restored, stored without pickle.

A state is a plain dict::

    {"python": [version, [625 ints], gauss_next],
     "numpy": {"kind": "MT19937", "keys": [624 ints], "pos": int, "has_gauss": int,
               "cached_gaussian": float},
     "torch_cpu": uint8 tensor,
     "cuda": [uint8 tensor per device]}      # only when CUDA was initialised

:func:`split_rng_state` separates it into a JSON part and a tensor part (written as
``rng/rank-NNNNN.json`` and ``.safetensors``); :func:`join_rng_state` puts it back together.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

__all__ = [
    "capture_rng_state",
    "join_rng_state",
    "restore_rng_state",
    "rng_json_problem",
    "rng_tensors_problem",
    "split_rng_state",
]

log = logging.getLogger(__name__)

_MT_WORDS = 624  # both python's and numpy's Mersenne Twister
_WORD = 1 << 32


def capture_rng_state() -> dict[str, Any]:
    """The state of python ``random``, numpy's global RNG, torch CPU and every CUDA device.

    CUDA states are captured only when CUDA is already initialised in this process: a run that
    never touched the GPU has not consumed its streams, and capturing would create a context on
    every device.
    """
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "kind": str(kind),
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put every stream back to ``state`` (from :func:`capture_rng_state`).

    CUDA states are restored for the devices both the state and this process have; a different
    device count is logged, since the streams of the missing devices cannot be continued.
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            np.asarray(npst["keys"], dtype=np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch_cpu"].cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count != len(cuda_states):
            log.warning(
                "checkpoint holds RNG states of %d CUDA device(s), this process sees %d; "
                "restoring the first %d",
                len(cuda_states),
                count,
                min(count, len(cuda_states)),
            )
        for device, dev_state in enumerate(cuda_states[:count]):
            torch.cuda.set_rng_state(dev_state.cpu(), device)
    elif cuda_states:
        log.warning("checkpoint holds CUDA RNG states but CUDA is not available; skipped")


def split_rng_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-compatible part, tensors) of a state."""
    tensors = {"torch_cpu": state["torch_cpu"].clone()}
    for i, t in enumerate(state.get("cuda") or []):
        tensors[f"cuda.{i}"] = t.clone()
    plain = {
        "python": state["python"],
        "numpy": state["numpy"],
        "cuda_devices": len(state.get("cuda") or []),
    }
    return plain, tensors


def join_rng_state(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Inverse of :func:`split_rng_state`."""
    state: dict[str, Any] = {
        "python": plain["python"],
        "numpy": plain["numpy"],
        "torch_cpu": tensors["torch_cpu"],
    }
    if plain.get("cuda_devices"):
        state["cuda"] = [tensors[f"cuda.{i}"] for i in range(plain["cuda_devices"])]
    return state


def _int(value: Any, low: int, high: int) -> bool:
    """``value`` is an int (not a bool) in ``[low, high)``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


def _words(value: Any, count: int) -> bool:
    return isinstance(value, list) and len(value) == count and all(_int(w, 0, _WORD) for w in value)


def rng_json_problem(plain: Any) -> str | None:
    """What is wrong with the JSON part of a saved RNG state (the field and why), or None.

    Checked before anything is restored, so a malformed file is reported as such, not as a
    TypeError from ``random.setstate`` halfway through a resume.
    """
    if not isinstance(plain, dict):
        return f"not a JSON object but a {type(plain).__name__}"
    python = plain.get("python")
    if not isinstance(python, list) or len(python) != 3:
        return "python: not [version, state, gauss_next]"
    version, internal, gauss = python
    if not _int(version, 2, 4):
        return f"python[0]: version {version!r} is not 2 or 3"
    if not (
        isinstance(internal, list)
        and len(internal) == _MT_WORDS + 1
        and _words(internal[:-1], _MT_WORDS)
        and _int(internal[-1], 0, _MT_WORDS + 1)
    ):
        return f"python[1]: not {_MT_WORDS} 32-bit words and a position"
    if gauss is not None and not isinstance(gauss, float):
        return f"python[2]: gauss_next {gauss!r} is not a float or null"
    numpy = plain.get("numpy")
    if not isinstance(numpy, dict):
        return "numpy: missing or not an object"
    checks = {
        "kind": numpy.get("kind") == "MT19937",
        "keys": _words(numpy.get("keys"), _MT_WORDS),
        "pos": _int(numpy.get("pos"), 0, _MT_WORDS + 1),
        "has_gauss": _int(numpy.get("has_gauss"), 0, 2),
        "cached_gaussian": isinstance(numpy.get("cached_gaussian"), (int, float))
        and not isinstance(numpy.get("cached_gaussian"), bool),
    }
    for key, ok in checks.items():
        if not ok:
            return f"numpy.{key}: missing or invalid ({str(numpy.get(key))[:40]!r})"
    if not _int(plain.get("cuda_devices", 0), 0, 1 << 16):
        return f"cuda_devices: {plain.get('cuda_devices')!r} is not a device count"
    return None


def rng_tensors_problem(
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]], cuda_devices: int
) -> str | None:
    """What is wrong with the tensors of a saved RNG state (``{name: (dtype, shape)}``)."""
    cpu_size = torch.get_rng_state().numel()
    if tensors.get("torch_cpu") != (torch.uint8, (cpu_size,)):
        return f"torch_cpu: not a uint8 tensor of {cpu_size} bytes ({tensors.get('torch_cpu')})"
    for i in range(cuda_devices):
        got = tensors.get(f"cuda.{i}")
        if got is None or got[0] != torch.uint8 or len(got[1]) != 1:
            return f"cuda.{i}: missing or not a uint8 vector ({got})"
    return None
