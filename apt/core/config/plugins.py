"""Plugins chosen by name in YAML: ``kind:`` plus the plugin's own options.

``training.task: {kind: causal_lm}`` (or the bare string ``causal_lm``) picks a registered task;
every other key of the mapping is one of that task's options, validated by the task's own
options model when the task is built (:func:`validate_options`), because the plugins live in
``apt.trainops`` and may come from the user's own module.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from apt.core.errors import ConfigError
from apt.core.registry import closest_names

__all__ = ["PluginSpec", "TaskSpec", "TokenizerSpec", "validate_options"]


class PluginSpec(BaseModel):
    """``{kind: <registered name>, <option>: <value>, ...}``; a bare string is the kind alone."""

    model_config = ConfigDict(extra="allow", frozen=True)
    #: Whether changing the plugin or its options refuses a resume (see config.resume).
    resume: ClassVar[Literal["critical", "free"] | None] = None

    kind: str = Field(description="Registered name of the implementation.")

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        return {"kind": data} if isinstance(data, str) else data

    @property
    def options(self) -> dict[str, Any]:
        """The plugin's options (every key but ``kind``)."""
        return dict(self.model_extra or {})


class TaskSpec(PluginSpec):
    """The training task (``python -m apt tasks`` lists them) and its options."""

    resume = "critical"  # another objective: another run

    kind: str = Field(
        "causal_lm",
        description="Task name, or 'package.module:Class' for a task in your own module.",
    )


class TokenizerSpec(PluginSpec):
    """The tokenizer and its options."""

    resume = "critical"  # other token ids: another run

    kind: str = Field(
        "byte",
        description="Tokenizer name: byte (UTF-8 bytes, 256 ids), bpe (a tokenizer.json trained "
        "by `python -m apt data tokenizer`; option path) or hf (any tokenizer.json or Hugging "
        "Face tokenizer folder on disk; options path, eos_token).",
    )


M = TypeVar("M", bound=BaseModel)


def validate_options(options_model: type[M], options: dict[str, Any], *, where: str) -> M:
    """Validate a plugin's options with its options model.

    Args:
        options_model: the plugin's pydantic model of options (``extra="forbid"``).
        options: the spec's options.
        where: the dotted config key of the spec (``training.task``), for messages.

    Raises:
        ConfigError: one line per bad option, naming ``<where>.<option>``, with the closest
            valid names for an unknown one.
    """
    try:
        return options_model.model_validate(options)
    except ValidationError as exc:
        valid = list(options_model.model_fields)
        lines = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"])
            if error["type"] == "extra_forbidden":
                hint = closest_names(key, valid)
                did_you_mean = f" Did you mean {' or '.join(map(repr, hint))}?" if hint else ""
                lines.append(
                    f"{where}.{key}: unknown option.{did_you_mean} Valid options: "
                    f"{', '.join(valid) or 'none'}"
                )
            else:
                lines.append(f"{where}.{key}: {error['msg']} (got {error.get('input')!r})")
        raise ConfigError("\n  - ".join(lines)) from None
