"""Callbacks chosen in YAML (``callbacks: [{name: early_stopping, patience: 3}]``)."""

from __future__ import annotations

import inspect
from typing import Any

from apt.core.config import CallbackSpec
from apt.core.errors import ConfigError
from apt.core.registry import Registry
from apt.trainops.engine.callbacks.base import Callback
from apt.trainops.engine.callbacks.builtin import (
    EarlyStopping,
    GradientNormMonitor,
    LRMonitor,
    MetricsLogger,
    ProgressBar,
)
from apt.trainops.engine.callbacks.curriculum import EntropyBasedVotingCallback, ScheduleCallback

__all__ = ["CALLBACKS", "build_callback", "build_callbacks"]

CALLBACKS: Registry[type[Callback]] = Registry("callback")
CALLBACKS.register("progress_bar")(ProgressBar)
CALLBACKS.register("metrics_logger")(MetricsLogger)
CALLBACKS.register("lr_monitor")(LRMonitor)
CALLBACKS.register("gradient_norm_monitor")(GradientNormMonitor)
CALLBACKS.register("early_stopping")(EarlyStopping)
CALLBACKS.register("schedule")(ScheduleCallback)
CALLBACKS.register("entropy_voting")(EntropyBasedVotingCallback)


def _callback_class(name: str) -> type[Callback]:
    cls = CALLBACKS.lookup(name)
    if not (isinstance(cls, type) and issubclass(cls, Callback)):
        raise ConfigError(
            f"callbacks: {name!r} must name a subclass of apt.trainops.engine.Callback "
            f"(found {type(cls).__name__ if cls is not None else 'nothing'})"
        )
    return cls


def build_callback(spec: CallbackSpec, **runtime: Any) -> Callback:
    """Instantiate one callback from its spec.

    ``runtime`` objects (``sink``, ``model_config``, ``schedules``, ...) are passed to keyword
    parameters of the constructor with the same name; the spec's options fill the rest.

    Raises:
        ConfigError: unknown name (valid names listed), import failure, or unknown options.
    """
    cls = _callback_class(spec.name)
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p != "self"]
    options = spec.options
    unknown = [k for k in options if k not in accepted or k in runtime]
    if unknown:
        valid = [p for p in accepted if p not in runtime]
        raise ConfigError(
            f"callbacks: {spec.name!r} has no option {', '.join(map(repr, unknown))}. "
            f"Valid options: {', '.join(valid) or 'none'}"
        )
    injected = {k: v for k, v in runtime.items() if k in params}
    try:
        return cls(**options, **injected)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"callbacks: cannot build {spec.name!r}: {exc}") from None


def build_callbacks(specs: list[CallbackSpec], **runtime: Any) -> list[Callback]:
    """Instantiate every callback of a ``callbacks:`` list, in order."""
    return [build_callback(spec, **runtime) for spec in specs]
