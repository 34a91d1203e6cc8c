"""One small registry used for every pluggable component (strategies, tasks, callbacks, ...)."""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

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
        lazy: built-in entries by import path (``name: "package.module:Name"``), imported on
            first use: listing names and their one-line summaries imports nothing, so a
            command such as ``python -m apt tasks`` needs no torch.
    """

    def __init__(self, kind: str, lazy: dict[str, str] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._lazy: dict[str, str] = dict(lazy or {})

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``.

        Raises:
            ValueError: if ``name`` is already taken (an internal programming error).
        """

        def decorate(obj: T) -> T:
            if name in self._items or name in self._lazy:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        """Return the implementation registered as ``name``.

        Raises:
            ConfigError: naming the unknown entry, the closest names and every valid name.
        """
        if name in self._lazy:
            self._items[name] = cast(T, _import(self._lazy.pop(name)))
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
        return sorted({*self._items, *self._lazy})

    def summary(self, name: str) -> str:
        """The first sentence of the entry's docstring; a lazy entry's is read from its source
        file without importing it."""
        if name in self._lazy:
            return _source_summary(self._lazy[name])
        return _first_sentence(inspect.getdoc(self.get(name)) or "")

    def is_builtin(self, name: str) -> bool:
        """Whether ``name`` is a built-in entry not imported yet (or a registered one)."""
        return name in self._lazy or name in self._items

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _import(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _source_summary(target: str) -> str:
    """The first docstring line of ``package.module:Name``, read from the module's file.

    Only the top-level package is looked up (``find_spec`` of a submodule would import its
    parent packages); the rest of the dotted name is a path below it.
    """
    module_name, _, attr = target.partition(":")
    top, *rest = module_name.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return ""
    path = Path(next(iter(spec.submodule_search_locations)), *rest).with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef) and node.name == attr:
            return _first_sentence(ast.get_docstring(node) or "")
    return ""


def _first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]
