"""``schedules:`` — curriculum: switch model modules on, anneal their attributes."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, RootModel, Tag

from apt.core.config.base import Section

__all__ = [
    "ALIASES",
    "ENABLE_KEY",
    "ENTRY_TAGS",
    "SCHEDULABLE",
    "AnnealSpec",
    "SchedulesConfig",
    "resolve_attribute",
    "schedule_errors",
]

#: ``enable_<module>_at_<epoch|step>``.
ENABLE_KEY = re.compile(r"^enable_(?P<module>[a-z_]+?)_at_(?P<by>epoch|step)$")

#: What each switchable module of an APT model lets a curriculum anneal (module -> attributes).
#: The one declaration: the model config derives what a profile may schedule from it, and the
#: model derives what it exposes from it.
SCHEDULABLE: dict[str, tuple[str, ...]] = {
    "router": ("temperature",),
    "moe": ("capacity_factor", "aux_loss_weight"),
    "align": ("loss_weight",),
    "voter": ("entropy_threshold",),
}

#: Short names from the original design notes, and the attribute each one drives.
ALIASES: dict[str, str] = {
    "route_temp": "router.temperature",
    "moe_capacity": "moe.capacity_factor",
    "align_weight": "align.loss_weight",
    "vote_threshold": "voter.entropy_threshold",
}


class AnnealSpec(Section):
    """Move an attribute from ``start`` to ``end`` over the run."""

    resume = "critical"

    start: float = Field(description="Value at the beginning (after warmup).")
    end: float = Field(description="Value at the end of training.")
    by: Literal["epoch", "step"] = Field("epoch", description="Clock that drives the schedule.")
    type: Literal["linear", "cosine"] = Field("linear", description="Interpolation shape.")
    warmup: int = Field(
        0, ge=0, description="Ramp linearly from 0 to start over this many units of `by` first."
    )


def _entry_kind(value: Any) -> str:
    return "anneal" if isinstance(value, (dict, AnnealSpec)) else "epoch_or_step"


#: A module switch (an epoch or step number) or an annealing spec.
ScheduleEntry = Annotated[
    Annotated[int, Tag("epoch_or_step")] | Annotated[AnnealSpec, Tag("anneal")],
    Discriminator(_entry_kind),
]

#: The tags above, which pydantic inserts into error locations.
ENTRY_TAGS = ("epoch_or_step", "anneal")


class SchedulesConfig(RootModel[dict[str, ScheduleEntry]]):
    """Keys are ``enable_<module>_at_epoch|step: N``, an alias (``route_temp``) or a dotted
    ``module.attribute``; names are checked against the model's declared modules."""

    #: Another curriculum is another run.
    resume: ClassVar[Literal["critical", "free"] | None] = "critical"

    root: dict[str, ScheduleEntry] = Field(default_factory=dict)


_NO_MODULES = "none (add model.moe, model.align or model.voter)"


def _valid_names(attributes: list[str]) -> str:
    if not attributes:
        return _NO_MODULES
    aliases = [alias for alias, target in ALIASES.items() if target in attributes]
    return ", ".join(attributes) + (f" (aliases: {', '.join(aliases)})" if aliases else "")


def resolve_attribute(name: str, attributes: list[str]) -> str:
    """The dotted ``module.attribute`` that ``name`` (itself or an alias) names.

    Raises:
        ValueError: ``name`` is none of ``attributes``; the message lists the valid names.
    """
    target = ALIASES.get(name, name)
    if target not in attributes:
        raise ValueError(
            f"{target!r} is not a schedulable attribute of this model. "
            f"Valid: {_valid_names(attributes)}"
        )
    return target


def schedule_errors(
    entries: dict[str, Any], *, modules: list[str], attributes: list[str]
) -> list[str]:
    """What is wrong with ``schedules:`` entries for a model with these switchable ``modules``
    and schedulable ``attributes``: one ``schedules.<key>: ...`` line per bad entry.

    The one check of schedule names: the config runs it against what its ``model`` section
    builds, the curriculum against the model it drives (which may be the user's own).
    """
    errors = []
    for key, value in entries.items():
        match = ENABLE_KEY.match(key)
        if match:
            if not isinstance(value, int):
                errors.append(f"schedules.{key}: must be an integer {match['by']} number")
            elif match["module"] not in modules:
                known = ", ".join(modules) or _NO_MODULES
                errors.append(
                    f"schedules.{key}: the model has no module {match['module']!r}. Switchable "
                    f"modules: {known}"
                )
            continue
        if isinstance(value, int):
            errors.append(
                f"schedules.{key}: an integer is only valid for enable_<module>_at_epoch|step keys"
            )
            continue
        try:
            resolve_attribute(key, attributes)
        except ValueError as exc:
            errors.append(f"schedules.{key}: {exc}")
    return errors
