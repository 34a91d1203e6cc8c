"""``training.device``: the forms it may take, and whether the machine has that device.

The form is checked by the schema (no torch needed); whether the device is there can only be
checked where torch is imported, by :func:`check_device_present` with what torch reports
(``python -m apt config validate`` and ``train`` call it before building anything).
"""

from __future__ import annotations

import re

from apt.core.errors import ConfigError

__all__ = ["DEVICE_FORMS", "check_device_present", "is_device_form"]

#: What ``training.device`` may say; ``cuda:N`` picks GPU N of a single process.
DEVICE_FORMS = ("auto", "cpu", "cuda", "cuda:N", "mps")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:(0|[1-9][0-9]{0,3}))?)$")


def is_device_form(device: str) -> bool:
    """Whether ``device`` is one of :data:`DEVICE_FORMS` (``cuda:N`` with N a GPU index)."""
    return _DEVICE.match(device) is not None


def check_device_present(
    device: str, *, cuda_devices: int, mps_available: bool, where: str | None = None
) -> None:
    """Refuse a ``training.device`` this machine does not have.

    Args:
        device: the validated ``training.device``.
        cuda_devices: ``torch.cuda.device_count()`` (0 without CUDA).
        mps_available: ``torch.backends.mps.is_available()``.
        where: where the value was set (``file:line``, ``--set ...``), for the message.

    Raises:
        ConfigError: naming ``training.device``, what the machine has and what to set instead.
    """
    have = f"{cuda_devices} CUDA device(s)" if cuda_devices else "no CUDA device"
    fix = "use device: auto (cuda when present, else cpu) or cpu"
    at = f" [{where}]" if where else ""
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if index >= cuda_devices:
            last = f"; cuda:0 .. cuda:{cuda_devices - 1} exist" if cuda_devices else ""
            raise ConfigError(
                f"training.device: {device!r}, but this machine has {have}{last}. To fix: "
                f"{fix}.{at}"
            )
    elif device == "mps" and not mps_available:
        raise ConfigError(
            f"training.device: 'mps', but this machine has no MPS (Apple GPU) device. To fix: "
            f"{fix}.{at}"
        )
