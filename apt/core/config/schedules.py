"""``schedules:`` — curriculum: switch model modules on, anneal their attributes."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, RootModel, Tag

from apt.core.config.base import Section

__all__ = ["ALIASES", "ENABLE_KEY", "ENTRY_TAGS", "AnnealSpec", "SchedulesConfig"]

#: ``enable_<module>_at_<epoch|step>``.
ENABLE_KEY = re.compile(r"^enable_(?P<module>[a-z_]+?)_at_(?P<by>epoch|step)$")

#: Short names from the original design notes, and the attribute each one drives.
ALIASES: dict[str, str] = {
    "route_temp": "router.temperature",
    "moe_capacity": "moe.capacity_factor",
    "align_weight": "align.loss_weight",
    "vote_threshold": "voter.entropy_threshold",
}


class AnnealSpec(Section):
    """Move an attribute from ``start`` to ``end`` over the run."""

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

    root: dict[str, ScheduleEntry] = Field(default_factory=dict)
