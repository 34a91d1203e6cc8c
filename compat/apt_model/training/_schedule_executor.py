"""The APT 1.x curriculum executor: interpolators and ``ScheduleExecutor`` with 1.x semantics.

APT 2.0 runs ``schedules:`` as a built-in callback (:mod:`apt.trainops.engine.curriculum`),
where a value reaches ``end`` at the last epoch or step. This module keeps the 1.x arithmetic for
code that drives its own modules by hand:

* epoch-driven values use ``t = epoch / total_epochs``; step-driven ones ``t = step /
  total_steps`` (a total of 0 counts as 1);
* ``warmup`` (steps only) ramps linearly from 0 to ``start`` over ``warmup`` steps, then the value
  moves from ``start`` to ``end`` over the remaining ``total_steps - warmup`` steps;
* an unknown ``type`` interpolates linearly;
* ``enable_<module>_at_epoch: N`` calls ``modules[<module>].enable(True)`` at epoch N exactly;
* the four 1.x names drive ``set_<attribute>(value)``: ``route_temp`` -> ``router.temperature``,
  ``moe_capacity`` -> ``moe.capacity_factor``, ``align_weight`` -> ``align.loss_weight``,
  ``vote_threshold`` -> ``voter.entropy_threshold``; a module missing from ``modules`` (or
  without the setter) is skipped, as 1.x did for models without that module.

Where 1.x produced no value it still produces none, and says so once in a warning (an entry
without ``by``, without ``start``/``end``, with an unknown name, ``enable_*_at_step``). Where
1.x crashed or produced nonsense it raises :class:`~apt.core.errors.ConfigError` at that point
instead: ``warmup >= total_steps`` once the warmup is over (1.x divided by zero or by a negative
span), ``schedules`` that is not a mapping, and non-numeric ``start``/``end``/``warmup``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from apt.core.errors import ConfigError

__all__ = ["PARAMETERS", "ScheduleExecutor", "cosine_anneal", "get_interpolator", "lerp"]

log = logging.getLogger("apt.compat")

#: 1.x schedule name -> (module key in ``modules``, attribute set through ``set_<attribute>``).
PARAMETERS: dict[str, tuple[str, str]] = {
    "route_temp": ("router", "temperature"),
    "moe_capacity": ("moe", "capacity_factor"),
    "align_weight": ("align", "loss_weight"),
    "vote_threshold": ("voter", "entropy_threshold"),
}

_ENABLE_PREFIX, _EPOCH_SUFFIX, _STEP_SUFFIX = "enable_", "_at_epoch", "_at_step"


def lerp(start: float, end: float, t: float) -> float:
    """Linear interpolation: ``start`` at ``t = 0``, ``end`` at ``t = 1`` (extrapolates)."""
    return start + (end - start) * t


def cosine_anneal(start: float, end: float, t: float) -> float:
    """Half-cosine from ``start`` at ``t = 0`` to ``end`` at ``t = 1``."""
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


_INTERPOLATORS: dict[str, Callable[[float, float, float], float]] = {
    "linear": lerp,
    "cosine": cosine_anneal,
}


def get_interpolator(schedule_type: str = "linear") -> Callable[[float, float, float], float]:
    """The interpolation function named ``schedule_type``: ``linear`` or ``cosine``; any other
    name gives ``linear`` (the 1.x fallback)."""
    return _INTERPOLATORS.get(schedule_type, lerp)


def _schedules_of(config: Any) -> dict[str, Any]:
    """``config.schedules`` as a plain dict (absent: empty). A 2.0 ``SchedulesConfig`` is
    dumped, so a config from ``load_profile`` works too."""
    if not hasattr(config, "schedules"):
        return {}
    schedules = config.schedules
    if hasattr(schedules, "model_dump"):  # apt.core.config.SchedulesConfig (a pydantic model)
        schedules = schedules.model_dump()
    if not isinstance(schedules, Mapping):
        raise ConfigError(
            f"ScheduleExecutor: config.schedules must be a mapping of schedule names to "
            f"epochs or {{start, end, by}} entries, got {type(schedules).__name__}. Give a dict "
            "(an empty one for no schedules)."
        )
    return dict(schedules)


def _number(key: str, field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"schedules.{key}.{field}: must be a number, got {value!r}")
    return float(value)


class ScheduleExecutor:
    """Applies ``config.schedules`` to ``modules`` with the APT 1.x formulas (module docstring).

    Args:
        config: any object with a ``schedules`` mapping (or none: no schedules); a 2.0
            :class:`~apt.core.config.APTConfig` works too.
        modules: name -> object with ``enable(flag)`` and ``set_<attribute>(value)`` methods.
        total_epochs: epochs of the run (``t = epoch / total_epochs``).
        total_steps: optimizer steps of the run (``t = step / total_steps``).

    Raises:
        ConfigError: ``schedules`` is not a mapping, or an entry holds a non-numeric
            ``start``/``end``/``warmup``.
    """

    def __init__(
        self, config: Any, modules: dict[str, Any], total_epochs: int, total_steps: int
    ) -> None:
        self.config = config
        self.schedules = _schedules_of(config)
        self.modules = modules
        self.total_epochs = total_epochs
        self.total_steps = total_steps
        for key, value in self.schedules.items():
            self._check(key, value)
        log.info("legacy ScheduleExecutor: %d schedule entries", len(self.schedules))

    def _check(self, key: str, value: Any) -> None:
        """Refuse what 1.x would crash on; warn about what 1.x silently ignored."""
        ignored = None
        if key.startswith(_ENABLE_PREFIX) and key.endswith(_STEP_SUFFIX):
            ignored = "enable_<module>_at_step is not a 1.x schedule (the 2.0 engine runs it)"
        elif isinstance(value, Mapping):
            for field in ("start", "end", "warmup"):
                if value.get(field) is not None:
                    _number(key, field, value[field])
            if value.get("start") is None or value.get("end") is None:
                ignored = "it needs both start and end"
            elif value.get("by") not in ("epoch", "step"):
                ignored = f"by must be 'epoch' or 'step' (got {value.get('by')!r})"
            elif key not in PARAMETERS:
                ignored = f"only {', '.join(PARAMETERS)} drive a module"
        elif not key.startswith(_ENABLE_PREFIX):
            ignored = "an entry is enable_<module>_at_epoch: N or a {start, end, by} mapping"
        if ignored:
            log.warning("legacy ScheduleExecutor ignores schedules.%s as 1.x did: %s", key, ignored)

    def on_epoch_start(self, epoch: int) -> None:
        """Enable the modules due at ``epoch``, then set the epoch-driven values."""
        for key, value in self.schedules.items():
            if key.startswith(_ENABLE_PREFIX) and key.endswith(_EPOCH_SUFFIX) and epoch == value:
                name = key[len(_ENABLE_PREFIX) : -len(_EPOCH_SUFFIX)]
                if name in self.modules:
                    self.modules[name].enable(True)
                    log.info("[epoch %d] enabled %s", epoch, name)
        self._update_parameters(epoch / max(self.total_epochs, 1), by="epoch")

    def on_step(self, step: int) -> None:
        """Set the step-driven values for optimizer step ``step``.

        Raises:
            ConfigError: a step schedule's warmup is over but ``warmup >= total_steps`` leaves
                no steps to anneal over.
        """
        self._update_parameters(step / max(self.total_steps, 1), by="step")

    def _value(self, key: str, t: float) -> float:
        """The value of anneal entry ``key`` at progress ``t`` (warmup included for steps)."""
        entry = self.schedules[key]
        start, end = float(entry["start"]), float(entry["end"])
        interpolate = get_interpolator(entry.get("type", "linear"))
        warmup = float(entry.get("warmup", 0) or 0)
        if entry.get("by") != "step" or warmup <= 0:
            return interpolate(start, end, t)
        done = t * self.total_steps  # the step, recomputed from t as 1.x did
        if done < warmup:
            return lerp(0.0, start, done / warmup)
        span = self.total_steps - warmup
        if span <= 0:
            raise ConfigError(
                f"schedules.{key}: warmup ({entry['warmup']}) must be smaller than total_steps "
                f"({self.total_steps}); at step {round(done)} the warmup is over and no steps are "
                "left to anneal over (APT 1.x divided by zero here). Lower the warmup or train "
                "for more steps."
            )
        return interpolate(start, end, (done - warmup) / span)

    def _update_parameters(self, t: float, by: str) -> None:
        for key, entry in self.schedules.items():
            if not isinstance(entry, Mapping) or entry.get("by") != by:
                continue
            if entry.get("start") is None or entry.get("end") is None:
                continue
            self._apply_value(key, self._value(key, t))

    def _apply_value(self, key: str, value: float) -> None:
        if key not in PARAMETERS:
            return
        name, attribute = PARAMETERS[key]
        setter = getattr(self.modules.get(name), f"set_{attribute}", None)
        if setter is not None:
            setter(value)
            log.debug("%s.%s = %.4f", name, attribute, value)
