"""Callbacks chosen in YAML (``callbacks: [{name: early_stopping, patience: 3}]``).

The registry itself, :data:`~apt.trainops.plugins.CALLBACKS`, lives in
:mod:`apt.trainops.plugins` so that names can be listed and checked without importing torch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from apt.core.config import CallbackSpec
from apt.core.errors import ConfigError
from apt.core.registry import closest_names
from apt.trainops.engine.callbacks.base import Callback
from apt.trainops.plugins import CALLBACKS

__all__ = ["CALLBACKS", "build_callback", "build_callbacks"]


def _callback_class(name: str) -> type[Callback]:
    cls = CALLBACKS.lookup(name)
    if not (isinstance(cls, type) and issubclass(cls, Callback)):
        found = type(cls).__name__ if cls is not None else "nothing"
        raise ConfigError(
            f"{name!r} must name a subclass of apt.trainops.engine.Callback (found {found})"
        )
    return cls


def build_callback(spec: CallbackSpec, **runtime: Any) -> Callback:
    """Instantiate one callback from its spec.

    ``runtime`` objects (``sink``, ``schedules``, ...) are passed to keyword parameters of the
    constructor with the same name; the spec's options fill the rest.

    Raises:
        ConfigError: unknown name (valid names listed), import failure, or unknown options
            (each with the nearest valid option).
    """
    cls = _callback_class(spec.name)
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self" and p not in runtime]
    unknown = [k for k in spec.options if k not in valid]
    if unknown:
        parts = []
        for key in unknown:
            near = closest_names(key, valid)
            parts.append(f"{key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        raise ConfigError(
            f"{spec.name!r} has no option {', '.join(parts)}. "
            f"Valid options: {', '.join(valid) or 'none'}"
        )
    injected = {k: v for k, v in runtime.items() if k in params}
    try:
        return cls(**spec.options, **injected)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build {spec.name!r}: {exc}") from None


def build_callbacks(
    specs: list[CallbackSpec], *, origin: Callable[[int], str] | None = None, **runtime: Any
) -> list[Callback]:
    """Instantiate every callback of a ``callbacks:`` list, in order.

    Args:
        specs: the ``callbacks:`` entries.
        origin: where entry ``i`` was written (``file:line``), for messages.
        **runtime: objects handed to constructors that take them (see :func:`build_callback`).

    Raises:
        ConfigError: listing every entry that cannot be built, each with its place.
    """
    built, errors = [], []
    for i, spec in enumerate(specs):
        try:
            built.append(build_callback(spec, **runtime))
        except ConfigError as exc:
            where = f" [{origin(i)}]" if origin is not None else ""
            errors.append(f"callbacks.{i} ({spec.name}): {exc}{where}")
    if errors:
        raise ConfigError("invalid callbacks:\n  - " + "\n  - ".join(errors))
    return built
