"""``callbacks:`` — extra callbacks by registry name or import path."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CallbackSpec"]


class CallbackSpec(BaseModel):
    """One callback: ``{name: early_stopping, monitor: val_loss, patience: 3}``.

    ``name`` is a built-in name or an import path ``package.module:ClassName``. The other keys
    are that callback's options, validated by the callback's own options model when it is built.
    """

    model_config = ConfigDict(extra="allow", frozen=True)
    resume: ClassVar[Literal["critical", "free"] | None] = "free"

    name: str = Field(description="Built-in callback name or 'package.module:ClassName'.")

    @property
    def options(self) -> dict[str, Any]:
        """The callback's options (every key but ``name``)."""
        return dict(self.model_extra or {})
