"""The base class every config section derives from."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

__all__ = ["Section"]


class Section(BaseModel):
    """A frozen pydantic model that rejects unknown keys.

    Every config section is one of these, so a misspelled key anywhere fails validation and a
    component can never mutate the config it was handed.

    ``resume`` says whether changing this section's fields between a checkpoint and a resume
    refuses the resume (``critical``) or is allowed (``free``); a field's own metadata
    (:data:`~apt.core.config.resume.CRITICAL` / ``FREE``) overrides it.
    """

    resume: ClassVar[Literal["critical", "free"] | None] = None

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_default=True,
        populate_by_name=True,
        use_attribute_docstrings=False,
    )
