"""Switchable modules and the groups a schedule drives.

A :class:`Switchable` keeps its on/off state and its scheduled scalars (router temperature,
loss weights, ...) in persistent buffers, so they travel with ``state_dict()`` under keys that
never change, and mirrors them in Python attributes, so ``forward`` branches on a plain bool
(no ``.item()``, no graph break) and reads scalars that ``torch.compile`` sees as tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["Controllable", "ModuleGroup", "Switchable"]


@runtime_checkable
class Controllable(Protocol):
    """What a schedule may switch: ``enable()``, ``disable()`` and an ``enabled`` flag."""

    @property
    def enabled(self) -> bool: ...

    def enable(self) -> None: ...

    def disable(self) -> None: ...


class Switchable(nn.Module):
    """Base of a module that can be switched on and off and has scheduled scalars.

    Args:
        enabled: initial state.
        scalars: initial values of the scheduled scalars; each becomes a float32 buffer of the
            same name.
    """

    is_enabled: torch.Tensor

    def __init__(self, enabled: bool, **scalars: float) -> None:
        super().__init__()
        self._enabled = bool(enabled)
        self._values = {name: float(value) for name, value in scalars.items()}
        self.register_buffer("is_enabled", torch.tensor(self._enabled))
        for name, value in self._values.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))

    @property
    def enabled(self) -> bool:
        """Whether the module is on."""
        return self._enabled

    def enable(self) -> None:
        """Switch on (a no-op when already on)."""
        if not self._enabled:
            self._on_enable()
            self._set_enabled(True)

    def disable(self) -> None:
        """Switch off (a no-op when already off)."""
        if self._enabled:
            self._set_enabled(False)
            self._on_disable()

    def _on_enable(self) -> None:
        """Hook run on the off -> on transition, before the flag flips."""

    def _on_disable(self) -> None:
        """Hook run on the on -> off transition, after the flag flips."""

    def _set_enabled(self, on: bool) -> None:
        self._enabled = on
        self.is_enabled.fill_(on)

    @property
    def scalar_names(self) -> tuple[str, ...]:
        """Names of the scheduled scalars."""
        return tuple(self._values)

    def get_scalar(self, name: str) -> float:
        """Current value of scalar ``name`` (from the Python mirror: no device sync)."""
        return self._values[self._check(name)]

    def set_scalar(self, name: str, value: float) -> None:
        """Set scalar ``name`` in place (a compiled graph reads the new value without retracing)."""
        self._values[self._check(name)] = float(value)
        with torch.no_grad():
            getattr(self, name).fill_(float(value))

    def _check(self, name: str) -> str:
        if name not in self._values:
            raise AttributeError(
                f"{type(self).__name__} has no scheduled value {name!r}; "
                f"it has {', '.join(self._values) or 'none'}"
            )
        return name

    def _sync_from_buffers(self) -> None:
        """Refresh the Python mirrors after the buffers were loaded."""
        self._enabled = bool(self.is_enabled)
        for name in self._values:
            self._values[name] = float(getattr(self, name))

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[arg-type]
        self._sync_from_buffers()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        super()._apply(fn, recurse)
        # Keep scheduled scalars float32 even under model.bfloat16(): re-create them from the
        # Python mirrors so the cast does not round a temperature or a loss weight.
        for name, value in self._values.items():
            buf = getattr(self, name)
            if buf.dtype != torch.float32 and not buf.is_meta:
                setattr(self, name, torch.tensor(value, dtype=torch.float32, device=buf.device))
        return self


class ModuleGroup:
    """One controllable name fanned out to several modules.

    ``enable()``/``disable()`` switch every member; reading a declared attribute returns its
    value (from the first member: all members hold the same), writing it sets every member.

    Args:
        members: the switchable modules of the group.
        attributes: public attribute name -> the members' scalar name.
        enable: replaces the plain fan-out of ``enable()`` (the model uses it to keep derived
            state, such as the align reference, in step with the switch).
    """

    _members: list[Switchable]
    _attributes: dict[str, str]
    _enable: Callable[[], None] | None

    def __init__(
        self,
        members: Sequence[Switchable],
        attributes: Mapping[str, str],
        enable: Callable[[], None] | None = None,
    ) -> None:
        object.__setattr__(self, "_members", list(members))
        object.__setattr__(self, "_attributes", dict(attributes))
        object.__setattr__(self, "_enable", enable)

    @property
    def members(self) -> list[Switchable]:
        """The modules this group drives."""
        return list(self._members)

    @property
    def attributes(self) -> list[str]:
        """Names of the attributes a schedule may set."""
        return list(self._attributes)

    @property
    def enabled(self) -> bool:
        """True when every member is on."""
        return bool(self._members) and all(m.enabled for m in self._members)

    def enable(self) -> None:
        """Switch every member on."""
        if self._enable is not None:
            self._enable()
            return
        for member in self._members:
            member.enable()

    def disable(self) -> None:
        """Switch every member off."""
        for member in self._members:
            member.disable()

    def __getattr__(self, name: str) -> float:
        attributes = object.__getattribute__(self, "_attributes")
        if name not in attributes:
            raise AttributeError(
                f"no schedulable attribute {name!r}; valid: {', '.join(attributes) or 'none'}"
            )
        return float(self._members[0].get_scalar(attributes[name]))

    def __setattr__(self, name: str, value: float) -> None:
        if name not in self._attributes:
            raise AttributeError(
                f"no schedulable attribute {name!r}; valid: {', '.join(self._attributes) or 'none'}"
            )
        for member in self._members:
            member.set_scalar(self._attributes[name], value)

    def __repr__(self) -> str:
        values = ", ".join(f"{a}={getattr(self, a):g}" for a in self._attributes)
        sep = ", " if values else ""
        return f"ModuleGroup(members={len(self._members)}, enabled={self.enabled}{sep}{values})"
