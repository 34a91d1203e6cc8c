"""One small registry used for every pluggable component (strategies, tasks, callbacks, ...)."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from apt.core.errors import ConfigError

__all__ = ["Registry", "closest_names"]

T = TypeVar("T")


def closest_names(name: str, candidates: list[str] | tuple[str, ...], n: int = 3) -> list[str]:
    """Return up to ``n`` candidates that look like ``name`` (for "did you mean" hints)."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)


class Registry(Generic[T]):
    """Maps names to implementations; a miss lists the valid names.

    Args:
        kind: what the registry holds, used in error messages ("strategy", "task", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``.

        Raises:
            ValueError: if ``name`` is already taken (an internal programming error).
        """

        def decorate(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        """Return the implementation registered as ``name``.

        Raises:
            ConfigError: naming the unknown entry, the closest names and every valid name.
        """
        try:
            return self._items[name]
        except KeyError:
            hint = closest_names(name, self.names())
            did_you_mean = f" Did you mean {' or '.join(map(repr, hint))}?" if hint else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}.{did_you_mean} "
                f"Valid names: {', '.join(self.names())}."
            ) from None

    def lookup(self, name: str) -> Any:
        """The entry registered as ``name``, or the object an import path
        ``package.module:Name`` names (imported now: a plugin in the user's own module; None
        when the module has no such name). The caller checks the object's type.

        Raises:
            ConfigError: unknown name (with the closest and every valid name), or an import
                path whose module cannot be imported.
        """
        if ":" not in name:
            return self.get(name)
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(
                f"{self.kind} {name!r}: cannot import module {module_name!r} ({exc}); check the "
                "package is installed or its folder is on PYTHONPATH"
            ) from None
        return getattr(module, attr, None)

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
