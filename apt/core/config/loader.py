"""``load_profile``: YAML -> ``extends`` parents merged -> dotted overrides -> validated config."""

from __future__ import annotations

import copy
import os
import re
import typing
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from apt.core.config.legacy import LEGACY_FIELDS, translate_legacy
from apt.core.config.plugins import PluginSpec
from apt.core.config.root import APTConfig
from apt.core.config.schedules import ENTRY_TAGS
from apt.core.config.schema_walk import field_annotation, model_at, unwrap
from apt.core.config.yaml_io import parse_yaml, read_yaml
from apt.core.errors import ConfigError
from apt.core.redact import redact
from apt.core.registry import closest_names

__all__ = ["list_profiles", "load_profile", "profile_files", "resolve_profile"]

_SUFFIXES = (".yaml", ".yml")
_DISCRIMINATORS = ("kind", "type")


def _packaged_dir() -> Path:
    return Path(str(resources.files("apt") / "profiles"))


def _search_dirs(search_path: list[Path] | None) -> list[Path]:
    """``./profiles``, then ``$APT_PROFILE_PATH`` entries, then the profiles inside the package."""
    if search_path is None:
        env = os.environ.get("APT_PROFILE_PATH", "")
        search_path = [Path(p) for p in env.split(os.pathsep) if p]
    return [Path("profiles"), *search_path, _packaged_dir()]


def resolve_profile(
    name_or_path: str | Path, search_path: list[Path] | None = None, relative_to: Path | None = None
) -> Path:
    """Find the file behind a profile name or path.

    Args:
        name_or_path: an existing file path, or a name such as ``standard`` or ``cpu/ddp``.
        search_path: extra folders searched after ``./profiles`` (default: ``$APT_PROFILE_PATH``).
        relative_to: folder searched first (the folder of a profile that ``extends`` this one).

    Raises:
        ConfigError: nothing matches; the message lists the folders searched and close names.
    """
    candidate = Path(name_or_path)
    if candidate.suffix in _SUFFIXES and candidate.is_file():
        return candidate
    dirs = ([relative_to] if relative_to else []) + _search_dirs(search_path)
    name = str(name_or_path)
    for folder in dirs:
        for suffix in ("", *_SUFFIXES):
            path = folder / f"{name}{suffix}"
            if path.is_file():
                return path
    known = list_profiles(search_path)
    searched = ", ".join(str(d) for d in dirs)
    if candidate.suffix in _SUFFIXES:
        raise ConfigError(
            f"{candidate}: no such file (relative paths are from {Path.cwd()}), and no profile "
            f"of that name in {searched}. Known profiles: {', '.join(known) or 'none'}."
        )
    hint = closest_names(name, known)
    did_you_mean = f" Did you mean {' or '.join(map(repr, hint))}?" if hint else ""
    raise ConfigError(
        f"profile {name!r} not found.{did_you_mean} Searched: {searched}. "
        f"Known profiles: {', '.join(known) or 'none'}."
    )


def list_profiles(search_path: list[Path] | None = None) -> list[str]:
    """Names of every profile found on the search path (first match of a name wins)."""
    return sorted(profile_files(search_path))


def profile_files(search_path: list[Path] | None = None) -> dict[str, Path]:
    """Each profile name and the file it resolves to (the first folder of the search path
    that has it wins: ``./profiles``, then ``$APT_PROFILE_PATH``, then the packaged ones)."""
    found: dict[str, Path] = {}
    for folder in _search_dirs(search_path):
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if path.suffix in _SUFFIXES:
                    found.setdefault(str(path.relative_to(folder).with_suffix("")), path)
    return found


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``top`` over ``base``; a changed ``kind``/``type`` replaces the whole mapping."""
    out = dict(base)
    for key, value in top.items():
        old = out.get(key)
        if (
            isinstance(old, dict)
            and isinstance(value, dict)
            and not any(tag in value and old.get(tag) != value[tag] for tag in _DISCRIMINATORS)
        ):
            out[key] = _merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _canonical_key(model: type[BaseModel] | None, key: str) -> str:
    """The field name behind ``key`` when ``key`` is one of its aliases (``lr``)."""
    if model is None or key in model.model_fields:
        return key
    for name, field in model.model_fields.items():
        if key in (getattr(field.validation_alias, "choices", None) or []):
            return name
    return key


def _canonicalize(data: Any, parts: list[str], root: dict[str, Any], where: str) -> Any:
    """Rename alias keys to field names throughout ``data`` (rooted at ``parts``)."""
    if not isinstance(data, dict):
        return data
    model = model_at(APTConfig, parts, root) if parts or data is root else None
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = _canonical_key(model, str(key)) if model is not None else key
        if name in out:
            dotted = ".".join([*parts, name])
            raise ConfigError(
                f"{where}: {dotted} is given twice (as {name!r} and an alias); keep one"
            )
        if isinstance(value, str) and _is_plugin(model_at(APTConfig, [*parts, name], root)):
            value = {"kind": value}  # a bare plugin name: merges and overrides see a mapping
        out[name] = _canonicalize(value, [*parts, name], root, where)
    return out


def _is_plugin(model: type[BaseModel] | None) -> bool:
    return model is not None and issubclass(model, PluginSpec)


def _leaf_paths(data: Any, prefix: str = "") -> list[str]:
    if isinstance(data, dict) and data:
        paths: list[str] = []
        for key, value in data.items():
            paths += _leaf_paths(value, f"{prefix}.{key}" if prefix else str(key))
        return paths
    return [prefix] if prefix else []


def _read_chain(
    path: Path,
    search_path: list[Path] | None,
    seen: tuple[Path, ...],
    via: str | None = None,
    *,
    legacy: bool = False,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Read ``path`` and its ``extends`` ancestors; return the merged data and its provenance.

    ``via`` is the ``file:line`` of the ``extends:`` that named ``path``, for messages.
    ``legacy``: each file's APT 1.x fields are translated first (:mod:`.legacy`)."""
    resolved = path.resolve()
    if resolved in seen:
        cycle = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"profiles extend each other in a cycle: {cycle}")
    try:
        sections = ("extends", *APTConfig.model_fields, *(LEGACY_FIELDS if legacy else ()))
        raw, lines = read_yaml(path, sections=sections)
        if legacy:
            raw = translate_legacy(raw, where=str(path))
    except ConfigError as exc:
        if via is None:
            raise
        raise ConfigError(f"{str(exc).rstrip('.')} (named by extends: at {via}).") from None
    parent_name = raw.pop("extends", None)
    data = _canonicalize(raw, [], raw, str(path))
    lines.update({_canonical_path(k): v for k, v in lines.items()})
    provenance = {key: f"{path}:{_line_of(key, lines)}" for key in _leaf_paths(data)}
    provenance.update(  # each entry of a list of mappings (callbacks.0, ...), for messages
        {key: f"{path}:{lines[key]}" for key in _item_paths(data) if key in lines}
    )
    if parent_name is None:
        return data, provenance
    if not isinstance(parent_name, str):
        raise ConfigError(f"{path}:{lines.get('extends')}: 'extends' must be a profile name")
    try:
        parent_path = resolve_profile(parent_name, search_path, relative_to=path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}:{lines.get('extends')}: extends: {exc}") from None
    parent, parent_provenance = _read_chain(
        parent_path,
        search_path,
        (*seen, resolved),
        via=f"{path}:{lines.get('extends')}",
        legacy=legacy,
    )
    merged = _merge(parent, data)
    # A child mapping that replaced its parent's (a new `type:`) drops the parent's entries.
    kept = {k: v for k, v in parent_provenance.items() if _has_path(merged, k)}
    return merged, {**kept, **provenance}


def _item_paths(data: Any, prefix: str = "") -> list[str]:
    """``key.i`` of every mapping inside a list (``callbacks.0``)."""
    paths: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            paths += _item_paths(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(data, list):
        paths += [f"{prefix}.{i}" for i, item in enumerate(data) if isinstance(item, dict)]
    return paths


def _line_of(dotted: str, lines: dict[str, int]) -> int | str:
    """The line of ``dotted``, or of the nearest key above it (``task: causal_lm`` became
    ``task.kind``)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        line = lines.get(".".join(parts[:i]))
        if line is not None:
            return line
    return "?"


def _canonical_path(dotted: str) -> str:
    """``training.lr`` -> ``training.learning_rate``."""
    parts: list[str] = []
    for part in dotted.split("."):
        parts.append(_canonical_key(model_at(APTConfig, parts), part))
    return ".".join(parts)


def _has_path(data: dict[str, Any], dotted: str) -> bool:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _parse_value(annotation: Any, text: str, key: str) -> Any:
    """Turn an override's text into a value for a field of type ``annotation``.

    Scalars stay text for pydantic to convert by the field's type ("true" -> bool, "3e-4" ->
    float, "007" stays "007" for a str field); lists, mappings and unknown fields go through YAML,
    under the limits of a profile file (``parse_yaml``).
    """
    members = unwrap(annotation) if annotation is not None else []
    if text.lower() in ("null", "none", "~") and (annotation is None or _allows_none(annotation)):
        return None
    scalar = (str, int, float, bool)
    if members and all(m in scalar or typing.get_origin(m) is typing.Literal for m in members):
        return text
    return parse_yaml(text, f"--set {key}", text_if_invalid=True)


def _allows_none(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _allows_none(typing.get_args(annotation)[0])
    return type(None) in typing.get_args(annotation)


def apply_overrides(
    data: dict[str, Any], overrides: list[str], provenance: dict[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Apply ``key.path=value`` strings to ``data`` (a copy is returned)."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"override {item!r} must look like section.key=value, e.g. training.max_steps=100"
            )
        parts = _canonical_path(key).split(".")
        key = ".".join(parts)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if isinstance(child, str):  # a bare plugin name gets options: keep it as the kind
                child = {"kind": child}
                node[part] = child
            elif not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        annotation = field_annotation(APTConfig, parts, out)
        node[parts[-1]] = _parse_value(annotation, text.strip(), key)
        provenance = {k: v for k, v in provenance.items() if not k.startswith(key + ".")}
        provenance[key] = f"--set {redact(item)}"
    return out, provenance


def _user_path(loc: tuple[Any, ...], data: dict[str, Any]) -> list[str]:
    """Drop the discriminator tags pydantic inserts into error locations."""
    parts: list[str] = []
    node: Any = data
    for elem in loc:
        if (isinstance(node, dict) and elem in node) or (
            isinstance(node, list) and isinstance(elem, int) and elem < len(node)
        ):
            parts.append(str(elem))
            node = node[elem]
        elif (
            isinstance(elem, str)
            and isinstance(node, dict)
            and node.get("kind", node.get("type")) == elem
        ):
            continue  # union tag
        elif elem in ENTRY_TAGS:
            continue
        else:
            parts.append(str(elem))
            node = None
    return parts


def _describe(error: Any, data: dict[str, Any], provenance: dict[str, str]) -> str:
    parts = _user_path(tuple(error["loc"]), data)
    message = str(error["msg"]).removeprefix("Value error, ")
    if not parts and (named := re.match(r"^([\w.]+): (.*)$", message, re.S)):
        # Cross-section checks (schedules vs model) name their key at the start of the message.
        parts, message = named[1].split("."), named[2]
    dotted = ".".join(parts) or "(top level)"
    where = (
        provenance.get(dotted)
        or next((v for k, v in provenance.items() if k.startswith(dotted + ".")), None)
        or next(
            (
                provenance[".".join(parts[:i])]
                for i in range(len(parts) - 1, 0, -1)
                if ".".join(parts[:i]) in provenance
            ),
            None,
        )
    )
    location = f" [{where}]" if where else ""
    if error["type"] == "extra_forbidden":
        parent = model_at(APTConfig, parts[:-1], data)
        valid = sorted(parent.model_fields) if parent is not None else []
        hint = closest_names(parts[-1], valid)
        did_you_mean = f" Did you mean {' or '.join(map(repr, hint))}?" if hint else ""
        return f"{dotted}: unknown key.{did_you_mean} Valid keys here: {', '.join(valid)}{location}"
    got = error.get("input")
    shown = (
        ""
        if isinstance(got, (dict, list)) or error["type"] == "missing"
        else f" (got {_short(got)})"
    )
    return f"{dotted}: {message}{shown}{location}"


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a value may be a whole file's text)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def validate(data: dict[str, Any], provenance: dict[str, str], source: str) -> APTConfig:
    """Validate merged profile data, turning pydantic's errors into one readable ConfigError."""
    try:
        config = APTConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(err, data, provenance) for err in exc.errors()]
        raise ConfigError(f"invalid config from {source}:\n  - " + "\n  - ".join(lines)) from None
    config._provenance = provenance
    config._source = source
    return config


def load_profile(
    name_or_path: str | Path,
    overrides: list[str] | None = None,
    search_path: list[Path] | None = None,
) -> APTConfig:
    """Load, merge, override and validate a profile.

    Args:
        name_or_path: a profile name (``quickstart``, ``standard``) or a YAML file path. Names are
            looked up in ``./profiles``, then ``$APT_PROFILE_PATH``, then the profiles shipped
            inside the package.
        overrides: ``"section.key=value"`` strings applied after the files, parsed by the type of
            the field they set (``"training.learning_rate=3e-4"``).
        search_path: folders used instead of ``$APT_PROFILE_PATH``.

    Returns:
        A frozen :class:`APTConfig` that remembers where each value came from.

    Raises:
        ConfigError: naming the file (and line), the dotted key, what was expected and, for
            unknown keys, the closest valid names.
    """
    return _load(resolve_profile(name_or_path, search_path), overrides, search_path)


def load_legacy_file(path: Path, overrides: list[str] | None = None) -> APTConfig:
    """Load a profile file that may hold APT 1.x fields (``plugins``, ``attention_name``, ...),
    translated by :func:`~apt.core.config.legacy.translate_legacy` in it and in each of its
    ``extends:`` parents; what ``APTConfig.from_yaml`` does."""
    return _load(resolve_profile(path, None), overrides, None, legacy=True)


def _load(
    path: Path,
    overrides: list[str] | None,
    search_path: list[Path] | None,
    *,
    legacy: bool = False,
) -> APTConfig:
    data, provenance = _read_chain(path, search_path, (), legacy=legacy)
    if overrides:
        data, provenance = apply_overrides(data, list(overrides), provenance)
    return validate(data, provenance, str(path))


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> APTConfig:
    """Validate a plain mapping (as read from a profile) with the same errors as load_profile."""
    return validate(copy.deepcopy(data), {k: source for k in _leaf_paths(data)}, source)
