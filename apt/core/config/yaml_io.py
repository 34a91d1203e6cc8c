"""Reading YAML profiles strictly: ``safe_load`` semantics, no duplicate keys, line numbers kept."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from apt.core.errors import ConfigError

__all__ = ["read_yaml"]

# YAML 1.1 (PyYAML) reads "3e-4" as a string; YAML 1.2 and every user read it as a number.
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads ``1e-4`` as a float."""


_StrictLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _check_duplicates(node: yaml.Node, path: Path) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"{path}:{line}: duplicate key {key!r} (first defined on line {seen[key]}); "
                    "keep one of them."
                )
            seen[key] = line
            _check_duplicates(value_node, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicates(item, path)


def _key_lines(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            out[dotted] = key_node.start_mark.line + 1
            _key_lines(value_node, dotted, out)
    elif isinstance(node, yaml.SequenceNode):  # callbacks.0, callbacks.1, ...
        for i, item in enumerate(node.value):
            out[f"{prefix}.{i}"] = item.start_mark.line + 1
            _key_lines(item, f"{prefix}.{i}", out)


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Read one profile file.

    Returns:
        The mapping it holds, and the line number of every dotted key in it.

    Raises:
        ConfigError: the file is missing, is not valid YAML (with file:line), holds duplicate
            keys, or its top level is not a mapping.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such profile file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the file ({exc})") from None
    try:
        loader = _StrictLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return {}, {}
            _check_duplicates(node, path)
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a profile must be a mapping of sections (model:, training:, ...), "
            f"not a {type(data).__name__}"
        )
    lines: dict[str, int] = {}
    _key_lines(node, "", lines)
    return data, lines
