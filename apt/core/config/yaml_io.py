"""Reading YAML profiles strictly: ``safe_load`` semantics, no duplicate keys, line numbers kept.

A profile may come from anywhere (``extends: /some/file``), so reading one is bounded: at most
:data:`MAX_BYTES` of text, :data:`MAX_NODES` nodes counting every alias expansion (a "billion
laughs" file is refused instead of expanded), :data:`MAX_DEPTH` levels of nesting, no alias
inside the value it names, and plain (scalar) mapping keys only. Errors about a file that turns
out not to be a profile name the file and the problem, never its text.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml

from apt.core.errors import ConfigError

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "parse_yaml", "read_yaml"]

#: Largest profile file (or YAML override value) read, in bytes: 1 MiB.
MAX_BYTES = 1 << 20
#: Most nodes (scalars, lists, mappings) one document may hold, an alias counting as a copy of
#: the value it names.
MAX_NODES = 100_000
#: Deepest nesting of lists and mappings.
MAX_DEPTH = 100

# YAML 1.1 (PyYAML) reads "3e-4" as a string; YAML 1.2 and every user read it as a number.
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _InvalidYAML(ConfigError):
    """The text is not YAML at all (as opposed to YAML over a limit)."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (keys are checked by ``_check_keys``)."""


_StrictLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_keys(node: yaml.MappingNode, where: str) -> None:
    """Mapping keys are scalars, each given once."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
            raise ConfigError(
                f"{where}:{_line(key_node)}: a mapping key is a {kind}; keys must be plain "
                "names (write `name: value`, and quote a name that starts with [ or {)."
            )
        key = key_node.value
        if key in seen:
            raise ConfigError(
                f"{where}:{_line(key_node)}: duplicate key {key!r} (first defined on line "
                f"{seen[key]}); keep one of them."
            )
        seen[key] = _line(key_node)


def _check_graph(root: yaml.Node, where: str) -> None:
    """Refuse recursive aliases, more than MAX_NODES expanded nodes, nesting past MAX_DEPTH
    and bad keys, visiting each node of the graph once (an alias bomb is never expanded)."""
    size: dict[int, int] = {}  # id(node) -> nodes once every alias is expanded
    depth: dict[int, int] = {}
    entered: set[int] = set()  # the nodes on the path from the root to the current one
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            entered.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(kid)] for kid in kids)
            depth[key] = 1 + max((depth[id(kid)] for kid in kids), default=0)
            if size[key] > MAX_NODES:
                raise ConfigError(
                    f"{where}:{_line(node)}: this value holds more than {MAX_NODES:,} YAML "
                    "nodes once its aliases (*name) are expanded, over the limit of a profile. "
                    "Write the values out, or share settings with extends: instead of aliases."
                )
            if depth[key] > MAX_DEPTH:
                raise ConfigError(
                    f"{where}:{_line(node)}: lists and mappings nested more than {MAX_DEPTH} "
                    "levels deep; a profile nests a few levels (section, key, value)."
                )
            continue
        if key in size:
            continue  # an alias of a value already checked
        if key in entered:
            raise ConfigError(
                f"{where}:{_line(node)}: recursive alias: an alias (*name) inside the value "
                "its anchor (&name) marks. A profile cannot hold a cycle; write the value out."
            )
        entered.add(key)
        if isinstance(node, yaml.MappingNode):
            _check_keys(node, where)
        stack.append((node, True))
        stack.extend((kid, False) for kid in reversed(_children(node)))


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


# A quoted fragment of a PyYAML message is the document's own text (an alias, a tag, a key);
# the document may be any file, so it is not shown. One character and <token> names stay.
_QUOTED = re.compile(r"'(?!<)[^']{2,}'|\"[^\"]{2,}\"")


def _problem(exc: yaml.MarkedYAMLError) -> str:
    text = exc.problem or exc.context or "not valid YAML"
    return _QUOTED.sub(lambda m: m[0] if m[0] in ("'\\t'", "'\\n'") else "(text not shown)", text)


def _compose(text: str, where: str) -> yaml.Node | None:
    """The document's node graph, syntax-checked; ConfigError naming ``where:line:col``."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise ConfigError(
            f"{where}: more than {MAX_BYTES // 2**20} MiB of YAML, over the limit of a profile "
            "(a profile holds settings: list data in data.train_files instead)."
        )
    try:
        loader = _StrictLoader(text)  # checks the characters at once
    except yaml.reader.ReaderError as exc:
        raise _InvalidYAML(
            f"{where}: invalid YAML: {exc.reason} (character {exc.position}); a profile is "
            "UTF-8 text"
        ) from None
    try:
        return loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        raise _InvalidYAML(f"{at}: invalid YAML: {_problem(exc)}") from None
    except yaml.YAMLError as exc:
        raise _InvalidYAML(f"{where}: invalid YAML ({type(exc).__name__})") from None
    except RecursionError:
        raise ConfigError(
            f"{where}: lists and mappings nested more than {MAX_DEPTH} levels deep"
        ) from None
    finally:
        loader.dispose()


def _construct(node: yaml.Node, where: str) -> Any:
    _check_graph(node, where)
    loader = _StrictLoader("")
    try:
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        raise ConfigError(f"{at}: invalid YAML: {_problem(exc)}") from None
    finally:
        loader.dispose()


def parse_yaml(text: str, where: str, *, text_if_invalid: bool = False) -> Any:
    """Read one YAML value (an override's list or mapping) under the limits of a profile.

    Args:
        text: the YAML text.
        where: what the text is, for messages (``--set training.optimizer``).
        text_if_invalid: return ``text`` itself when it is not valid YAML (an override's value,
            left for the schema to judge) instead of raising; the limits still raise.

    Raises:
        ConfigError: invalid YAML, or a document over :data:`MAX_BYTES`, :data:`MAX_NODES` or
            :data:`MAX_DEPTH`, a recursive alias, a list or mapping as a key, a duplicate key.
    """
    try:
        node = _compose(text, where)
    except _InvalidYAML:
        if text_if_invalid:
            return text
        raise
    return None if node is None else _construct(node, where)


def _read_text(path: Path) -> str:
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_BYTES + 1)  # bounded: a file in /proc reports size 0
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such profile file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_BYTES // 2**20} MiB, the limit of a profile; is it a "
            "profile? (a profile holds settings: list data in data.train_files instead)"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not an APT profile: not UTF-8 text (byte {exc.start} cannot be decoded)"
        ) from None


def _check_is_profile(node: yaml.Node, path: Path, sections: Collection[str]) -> None:
    """The top level is a mapping with at least one known section (or no key at all)."""
    if not isinstance(node, yaml.MappingNode):
        what = {yaml.SequenceNode: "a list", yaml.ScalarNode: "a single value"}[type(node)]
        raise ConfigError(
            f"{path}: not an APT profile: its top level is {what}; a profile must be a mapping "
            "of sections (model:, training:, ...)."
        )
    names = {k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    if node.value and not names & set(sections):
        known = ", ".join(sorted(sections))
        # None of the keys is a section: the file is something else, its keys are its text.
        raise ConfigError(
            f"{path}: not an APT profile: its top level has none of the keys a profile may "
            f"have ({known})."
        )


def read_yaml(
    path: Path, sections: Collection[str] | None = None
) -> tuple[dict[str, Any], dict[str, int]]:
    """Read one profile file.

    Args:
        path: the file.
        sections: the top-level keys a profile may have; a file whose top level has none of
            them is refused as a whole, without naming its keys. None: no such check.

    Returns:
        The mapping it holds, and the line number of every dotted key in it.

    Raises:
        ConfigError: the file is missing, unreadable, over the limits (:data:`MAX_BYTES`,
            :data:`MAX_NODES`, :data:`MAX_DEPTH`), not valid YAML (with file:line), holds
            duplicate or non-scalar keys or a recursive alias, or its top level is not a
            mapping (of known sections).
    """
    node = _compose(_read_text(path), str(path))
    if node is None:
        return {}, {}
    if sections is not None:
        _check_is_profile(node, path, sections)
    data = _construct(node, str(path))
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a profile must be a mapping of sections (model:, training:, ...), "
            f"not a {type(data).__name__}"
        )
    lines: dict[str, int] = {}
    _key_lines(node, "", lines)
    return data, lines
