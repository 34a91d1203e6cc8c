"""Finding the schema class behind a dotted key: for hints, override parsing and error paths."""

from __future__ import annotations

import types
import typing
from typing import Any, Union

from pydantic import BaseModel, RootModel

__all__ = ["field_annotation", "model_at", "unwrap"]


def unwrap(annotation: Any) -> list[Any]:
    """Flatten ``Annotated``, ``Optional`` and unions into their member types (``None`` dropped)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return unwrap(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        members: list[Any] = []
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                members += unwrap(arg)
        return members
    return [annotation]


def _pick_member(members: list[Any], raw: Any) -> type[BaseModel] | None:
    """Choose the model among union members, by discriminator value in ``raw`` if present."""
    models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
    if len(models) <= 1:
        return models[0] if models else None
    if isinstance(raw, dict):
        for model in models:
            for tag in ("kind", "type"):
                field = model.model_fields.get(tag)
                if field is not None and tag in raw and raw[tag] == field.default:
                    return model
    # Without a tag the union's default member is the first one listed.
    return models[0]


def _field_named(model: type[BaseModel], key: str) -> Any:
    """The annotation of ``key`` in ``model``, matching aliases too; None when unknown."""
    if key in model.model_fields:
        return model.model_fields[key].annotation
    for field in model.model_fields.values():
        choices = getattr(field.validation_alias, "choices", None) or []
        if key in choices:
            return field.annotation
    return None


def model_at(root: type[BaseModel], parts: list[str], raw: Any = None) -> type[BaseModel] | None:
    """The model class at the dotted ``parts`` under ``root``, or None if the path leaves models."""
    model: type[BaseModel] | None = root
    for part in parts:
        if model is None:
            return None
        raw = raw.get(part) if isinstance(raw, dict) else None
        annotation = _field_named(model, part)
        if annotation is None:
            return None
        model = _pick_member(unwrap(annotation), raw)
    return model


def field_annotation(root: type[BaseModel], parts: list[str], raw: Any = None) -> Any:
    """The annotation of the leaf at ``parts``, or None if unknown."""
    parent = model_at(root, parts[:-1], raw)
    if parent is None or issubclass(parent, RootModel):
        return None
    return _field_named(parent, parts[-1])
