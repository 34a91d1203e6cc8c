"""``is_dtensor`` without importing ``torch.distributed.tensor``.

Importing DTensor's package costs about half a second (it pulls in sympy through the symbolic
shape machinery); a run that never shards never needs it. A DTensor exists only once its module
is imported, so a module absent from ``sys.modules`` answers "no" for free.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["is_dtensor"]


def is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor`` (FSDP2/TP shards)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)
