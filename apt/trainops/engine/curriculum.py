"""Curriculum schedules: switch model modules on and anneal their attributes while training.

``schedules:`` keys (validated against the model config when the profile loads):

* ``enable_<module>_at_epoch: N`` / ``enable_<module>_at_step: N`` — the module is off before
  epoch (step) N and on from N; epochs and steps count from 0.
* ``<alias or module.attribute>: {start, end, by: epoch|step, type: linear|cosine, warmup}`` —
  with ``u`` the current epoch (step) and ``U`` the run's epochs (steps): during warmup
  (``u < warmup``) the value ramps linearly from 0 to ``start``; afterwards it moves from
  ``start`` (at ``u = warmup``) to ``end`` (at the last unit ``u = U - 1``), linearly or along a
  half cosine, and stays at ``end``.

The values are a pure function of (epoch, step), so a resumed run recomputes exactly what an
uninterrupted run would have; the executor's state only remembers what was already logged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from apt.core.config import AnnealSpec, SchedulesConfig
from apt.core.config.schedules import ENABLE_KEY, resolve_attribute, schedule_errors
from apt.core.errors import ConfigError

__all__ = ["ScheduleExecutor", "anneal_value"]

log = logging.getLogger("apt")


def anneal_value(spec: AnnealSpec, unit: int, total_units: int) -> float:
    """The scheduled value at ``unit`` (an epoch or step index) of ``total_units``."""
    if spec.warmup and unit < spec.warmup:
        return spec.start * unit / spec.warmup
    span = total_units - 1 - spec.warmup
    progress = 1.0 if span <= 0 else min(max((unit - spec.warmup) / span, 0.0), 1.0)
    if spec.type == "cosine":
        return spec.end + (spec.start - spec.end) * (1 + math.cos(math.pi * progress)) / 2
    return spec.start + (spec.end - spec.start) * progress


@dataclass(frozen=True)
class _Switch:
    module: str
    by: Literal["epoch", "step"]
    at: int


@dataclass(frozen=True)
class _Anneal:
    key: str
    attribute: str
    spec: AnnealSpec


class ScheduleExecutor:
    """Applies a ``schedules:`` section to a model that declares ``controllable_modules()``
    and ``set_scheduled(name, value)``.

    Args:
        schedules: the ``schedules`` section.
        model: the (unwrapped) model.
        total_steps: optimizer steps in the run.
        steps_per_epoch: optimizer steps per epoch.

    Raises:
        ConfigError: the model lacks a module or attribute the schedule names.
    """

    def __init__(
        self,
        schedules: SchedulesConfig,
        *,
        model: nn.Module,
        total_steps: int,
        steps_per_epoch: int,
    ) -> None:
        self.model = model
        self.total_steps = total_steps
        self.total_epochs = max(math.ceil(total_steps / max(steps_per_epoch, 1)), 1)
        self.switches: list[_Switch] = []
        self.anneals: list[_Anneal] = []
        declared: Any = model  # models declare these methods; nn.Module's typing does not
        modules: dict[str, Any] = (
            dict(declared.controllable_modules()) if hasattr(model, "controllable_modules") else {}
        )
        attributes: list[str] = (
            list(declared.schedulable_attributes())
            if hasattr(model, "schedulable_attributes")
            else []
        )
        errors = schedule_errors(dict(schedules.root), modules=list(modules), attributes=attributes)
        if errors:
            raise ConfigError("\n".join(errors))
        for key, value in schedules.root.items():
            match = ENABLE_KEY.match(key)
            if match:
                self.switches.append(_Switch(match["module"], match["by"], int(value)))  # type: ignore[arg-type]
            else:
                assert isinstance(value, AnnealSpec)
                self.anneals.append(_Anneal(key, resolve_attribute(key, attributes), value))
        self._modules = modules
        self._declared = declared
        self._logged: dict[str, Any] = {}

    def _units(self, by: str) -> int:
        return self.total_epochs if by == "epoch" else self.total_steps

    def apply(self, *, epoch: int, step: int, clock: Literal["epoch", "step", "all"]) -> None:
        """Bring switches and values of ``clock`` (or all) to their state at (epoch, step)."""
        for switch in self.switches:
            if clock not in ("all", switch.by):
                continue
            now = epoch if switch.by == "epoch" else step
            module = self._modules[switch.module]
            want = now >= switch.at
            if bool(module.enabled) != want:
                module.enable() if want else module.disable()
            self._log(
                f"switch:{switch.module}",
                want,
                f"{switch.module} {'on' if want else 'off'}",
                epoch,
                step,
            )
        for anneal in self.anneals:
            if clock not in ("all", anneal.spec.by):
                continue
            unit = epoch if anneal.spec.by == "epoch" else step
            value = anneal_value(anneal.spec, unit, self._units(anneal.spec.by))
            self._declared.set_scheduled(anneal.attribute, value)
            self._log_value(anneal, value, epoch, step)

    def _log(self, key: str, value: Any, text: str, epoch: int, step: int) -> None:
        if self._logged.get(key) != value:
            if key in self._logged or value:  # a module that starts off is not news
                log.info("schedule [epoch %d, step %d]: %s", epoch, step, text)
            self._logged[key] = value

    def _log_value(self, anneal: _Anneal, value: float, epoch: int, step: int) -> None:
        # Epoch-driven values change a few times a run: log each change. Step-driven values change
        # every step: log them when the epoch changes, so the log stays readable.
        key = f"value:{anneal.attribute}"
        marker = round(value, 6) if anneal.spec.by == "epoch" else epoch
        if self._logged.get(key) != marker:
            self._logged[key] = marker
            log.info(
                "schedule [epoch %d, step %d]: %s = %.4g", epoch, step, anneal.attribute, value
            )

    def state_dict(self) -> dict[str, Any]:
        """What was already announced (the values themselves are recomputed on resume)."""
        return {"logged": dict(self._logged)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._logged = dict(state.get("logged", {}))
