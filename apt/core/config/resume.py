"""Which config keys a resume may not change: declared in the schema, next to each field.

A key is *resume-critical* when changing it between a checkpoint and the run resuming from it
would make the resumed run a different run (another model, other data, another batch), so the
Trainer refuses (exit 2) unless told ``--allow-config-change``. Every field is classified:

* by its own metadata, ``Field(..., json_schema_extra=CRITICAL)`` (or ``FREE``), or else
* by its section's ``resume`` class attribute (``"critical"`` or ``"free"``).

Keys the schema does not describe one by one (a task's options, ``schedules:`` entries, a list
of callbacks) take the class of the section or field holding them. A test walks the whole
schema and fails on any field classified by neither, so a new field cannot be left out.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from apt.core.config.schema_walk import unwrap

__all__ = ["CRITICAL", "FREE", "Resume", "field_classes", "is_resume_critical"]

Resume = Literal["critical", "free"]

#: Field metadata: changing this key refuses a resume.
CRITICAL: dict[str, Any] = {"resume": "critical"}
#: Field metadata: this key may change on resume (the change is logged).
FREE: dict[str, Any] = {"resume": "free"}


def _declared(model: type[BaseModel], field: FieldInfo) -> Resume | None:
    extra = field.json_schema_extra
    if isinstance(extra, dict) and extra.get("resume") in ("critical", "free"):
        return extra["resume"]  # type: ignore[return-value]
    return getattr(model, "resume", None)


def _sections(annotation: Any) -> list[type[BaseModel]]:
    """The config sections a field holds directly (every member of a union)."""
    return [m for m in unwrap(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]


def field_classes(root: type[BaseModel]) -> Iterator[tuple[str, Resume | None]]:
    """``(dotted key, classification)`` of every leaf field under ``root``, through every
    member of a union; ``None`` marks a field nothing classifies."""

    def walk(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, Resume | None]]:
        for name, field in model.model_fields.items():
            dotted = f"{prefix}.{name}" if prefix else name
            sections = _sections(field.annotation)
            if not sections or model.model_fields.get("root") is field:
                yield dotted, _declared(model, field)
            for section in sections:
                yield from walk(section, dotted)

    yield from walk(root, "")


def is_resume_critical(root: type[BaseModel], dotted: str) -> bool:
    """Whether changing ``dotted`` (a key of the flattened ``config.to_dict()``) refuses a
    resume."""
    parts = dotted.split(".")
    model = root
    verdict: Resume | None = None
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:  # beyond what the schema spells out: the holder's class
            return (getattr(model, "resume", None) or verdict) == "critical"
        verdict = _declared(model, field) or verdict
        sections = _sections(field.annotation)
        if not sections or i + 1 == len(parts):
            return verdict == "critical"
        # In a union, the member that has the next key (the kinds share the rest).
        following = parts[i + 1]
        model = next((s for s in sections if following in s.model_fields), sections[0])
    return verdict == "critical"
