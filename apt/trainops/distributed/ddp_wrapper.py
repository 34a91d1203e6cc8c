"""``DDPWrapper``: the one-line DistributedDataParallel of APT 1.x, on top of torch's DDP.

>>> env = setup_distributed()            # doctest: +SKIP
>>> model = DDPWrapper(model)            # doctest: +SKIP

It is :class:`torch.nn.parallel.DistributedDataParallel` itself (``isinstance`` holds, ``.module``
is the user's model); the wrapper only moves the model to this rank's device and fills in
``device_ids``. Inside a config-driven run, the ``ddp`` strategy does the same from
``training.distributed.ddp``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from apt.core.errors import DistributedError

__all__ = ["DDPWrapper", "model_has_moe"]


def model_has_moe(model: nn.Module) -> bool:
    """True when the model declares a switchable ``moe`` module (``controllable_modules``).

    Experts that receive no token in a step get no gradient, which DDP must be told about
    (``find_unused_parameters``).
    """
    declared: Any = getattr(model, "controllable_modules", None)
    if callable(declared):
        declared = declared()
    try:
        return declared is not None and "moe" in declared
    except TypeError:
        return False


class DDPWrapper(DistributedDataParallel):
    """DistributedDataParallel on this rank's device, after :func:`setup_distributed`.

    Args:
        module: the model; moved to ``device`` (default: ``cuda:<current device>`` under NCCL,
            else where its parameters already are).
        device: override the device the model is moved to.
        **ddp_options: passed to DistributedDataParallel (``bucket_cap_mb``, ``static_graph``,
            ``find_unused_parameters``, ...). ``find_unused_parameters`` defaults to True for
            models that declare an ``moe`` module, else False.

    Raises:
        DistributedError: no process group is running.
    """

    def __init__(
        self, module: nn.Module, *, device: torch.device | str | None = None, **ddp_options: Any
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedError(
                "DDPWrapper needs a running process group: call setup_distributed() first, "
                "under torchrun (e.g. `torchrun --nproc-per-node 2 train.py`)."
            )
        if device is None:
            if "nccl" in str(dist.get_backend()):
                device = torch.device("cuda", torch.cuda.current_device())
            else:
                device = next((p.device for p in module.parameters()), torch.device("cpu"))
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        module = module.to(device)
        ddp_options.setdefault("find_unused_parameters", model_has_moe(module))
        if device.type == "cuda":
            ddp_options.setdefault("device_ids", [device.index])
            ddp_options.setdefault("output_device", device.index)
        super().__init__(module, **ddp_options)
