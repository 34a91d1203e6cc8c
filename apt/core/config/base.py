"""The base class every config section derives from."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, field_validator

__all__ = ["Section"]


class Section(BaseModel):
    """A frozen pydantic model that rejects unknown keys.

    Every config section is one of these, so a misspelled key anywhere fails validation and a
    component can never mutate the config it was handed.

    ``resume`` says whether changing this section's fields between a checkpoint and a resume
    refuses the resume (``critical``) or is allowed (``free``); a field's own metadata
    (:data:`~apt.core.config.resume.CRITICAL` / ``FREE``) overrides it.

    Two rules hold for every field of every section: a number must be finite (``.inf`` and
    ``.nan`` are refused; a field that means to allow them says ``Field(allow_inf_nan=True)``),
    and no text may hold a NUL character (it cannot be part of a path, a name or a log line).
    """

    resume: ClassVar[Literal["critical", "free"] | None] = None

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_default=True,
        populate_by_name=True,
        use_attribute_docstrings=False,
        allow_inf_nan=False,
    )

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        if _holds_nul(value):
            raise ValueError("holds a NUL character (\\x00); remove it")
        return value


def _holds_nul(value: Any) -> bool:
    """A text, or a list of texts, with a NUL; a mapping is a section checking its own fields."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, (list, tuple)):
        return any(_holds_nul(item) for item in value)
    return False
