"""The resolved config as flat ``dotted.key: value`` pairs, for stores without nesting."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["flatten_params"]


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"training": {"lr": 3e-4}}`` -> ``{"training.lr": 3e-4}``.

    Nested mappings become dotted keys; lists and tuples become their JSON text (a store's
    parameter is one value); every other value is kept as it is.

    >>> flatten_params({"model": {"size": 64, "tags": ["a"]}, "seed": 1})
    {'model.size': 64, 'model.tags': '["a"]', 'seed': 1}
    """
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(value, default=str)
        else:
            flat[name] = value
    return flat
