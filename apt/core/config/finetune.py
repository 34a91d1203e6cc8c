"""``finetune:`` — train part of a model: freeze parameters by name, or train LoRA adapters;
optionally hold it near where it started with a KL regulariser (``align``).

::

    finetune:
      freeze: [embeddings, "layers.0-5"]        # no gradient, no optimizer state
      lora:                                     # low-rank adapters; every base weight frozen
        rank: 8
        alpha: 16
        targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
        merge: true                             # export merged weights (false: the adapter alone)
      align:                                    # KL to the model as fine-tuning found it
        loss_weight: 0.1

Names are dotted patterns over the parameter (``freeze``, ``lora.trainable``) or module
(``lora.targets``) names of the model. A pattern matches a name that holds its components one
after another, each component matching one whole component of the name:

* a plain name: ``embed_tokens``, ``attn``, ``q_proj`` (``q_proj`` matches every block's);
* an fnmatch glob inside one component: ``blocks.*.mlp``, ``*_norm``;
* an integer range ``a-b`` (both ends included): ``blocks.0-5``;
* the aliases ``embeddings`` (``embed_tokens``), ``head`` (``lm_head``), ``layers`` (``blocks``).

The patterns are checked for form here; :mod:`apt.trainops.engine.freeze` matches them
against the model, where a pattern that matches nothing is an error listing real names.
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from apt.core.config.base import Section
from apt.core.config.resume import FREE

__all__ = [
    "DEFAULT_TARGETS",
    "NAME_ALIASES",
    "RANGE",
    "FinetuneAlignConfig",
    "FinetuneConfig",
    "LoRAConfig",
    "pattern_problem",
]

#: The projections of attention and of the SwiGLU feed-forward: LoRA's default targets.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Pattern components that stand for the APT model's own names.
NAME_ALIASES: dict[str, str] = {"embeddings": "embed_tokens", "head": "lm_head", "layers": "blocks"}
#: A pattern component that is an integer range, ``a-b``.
RANGE = re.compile(r"^(\d+)-(\d+)$")
_COMPONENT = re.compile(r"^[\w*?\[\]!-]+$")


def pattern_problem(pattern: str) -> str | None:
    """What is wrong with the form of a name pattern, or None when it is well formed."""
    if not pattern.strip():
        return "is empty; give a dotted name such as 'blocks.0' or 'embeddings'"
    for part in pattern.split("."):
        if not part:
            return f"{pattern!r} has an empty component (two dots, or a dot at an end)"
        if not _COMPONENT.match(part):
            return (
                f"{pattern!r}: component {part!r} may hold letters, digits, '_', '-' and the "
                "glob characters * ? [ ] only"
            )
        found = RANGE.match(part)
        if found and int(found.group(1)) > int(found.group(2)):
            return f"{pattern!r}: range {part!r} runs backwards; write it low-high"
    return None


def _checked(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        problem = pattern_problem(pattern)
        if problem is not None:
            raise ValueError(problem)
    return patterns


class LoRAConfig(Section):
    """Low-rank adapters on linear layers: ``W x + (alpha / rank) * B A x``, ``A`` (rank, in)
    and ``B`` (out, rank) trained, ``W`` frozen. ``B`` starts at zero, so step 0 computes what
    the base model does."""

    resume = "critical"  # another set of trained tensors: another run

    rank: int = Field(8, ge=1, le=4096, description="Rank r of the adapter matrices.")
    alpha: float = Field(
        16.0, gt=0, description="Scale numerator: the update is multiplied by alpha / rank."
    )
    rslora: bool = Field(
        False,
        description="Rank-stabilised scaling, alpha / sqrt(rank), instead of alpha / rank.",
    )
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the adapter's input (the base path has none)."
    )
    targets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        min_length=1,
        description="Linear modules that get adapters, as name patterns (see finetune).",
    )
    trainable: list[str] = Field(
        default_factory=list,
        description="Base parameters that train beside the adapters (name patterns, e.g. "
        "[norm]); every other base parameter is frozen. Saved in the adapter file.",
    )
    merge: bool = Field(
        True,
        description="Exports hold the base weights with the adapters merged in (true), or "
        "only the adapter: adapter_model.safetensors + adapter_config.json (false).",
        json_schema_extra=FREE,
    )

    @field_validator("targets", "trainable")
    @classmethod
    def _patterns_well_formed(cls, patterns: list[str]) -> list[str]:
        return _checked(patterns)


class FinetuneAlignConfig(Section):
    """A KL regulariser towards the starting model: ``loss_weight * KL(p_model || p_start)``,
    averaged over the trained positions (targets != -100), added to the loss. The start is
    the model before the first step (after LoRA adapters, which start at zero); a resumed run
    keeps the reference its checkpoint holds. Exports never carry it."""

    resume = "critical"  # another loss: another run

    loss_weight: float = Field(
        0.1,
        ge=0,
        description="Weight of KL(model || starting model) in the loss (0: computed, not "
        "trained on).",
    )


class FinetuneConfig(Section):
    """Which parameters train: all (the default), all but the ``freeze`` patterns, or LoRA
    adapters (``lora``) on a frozen base; and whether a KL to the starting model (``align``)
    holds the model near where it started."""

    resume = "critical"  # another set of trained tensors: another run

    base_model: str | None = Field(
        None,
        min_length=1,
        description="The model this run starts from: a folder written by save_pretrained / "
        "python -m apt export, or a name in the local model store ($APT_HOME). Its config "
        "replaces the model: section and, unless data.tokenizer is set, its tokenizer reads "
        "the data. None: the model the model: section describes (or the one passed in).",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="Parameters that get no gradient and no optimizer state, as name "
        "patterns: [embeddings, 'layers.0-5', 'blocks.*.attn_norm']. A tied head and "
        "embedding share one tensor: freezing either freezes both. With lora, applies to "
        "adapters too.",
    )
    lora: LoRAConfig | None = Field(
        None, description="Train low-rank adapters on a frozen base (None: no adapters)."
    )
    align: FinetuneAlignConfig | None = Field(
        None,
        description="Add KL(model || the model at the start of fine-tuning) to the loss, "
        "averaged over trained positions (None: no such term). APT models without model.align "
        "only; the reference copies the parameters that train and is kept out of exports.",
    )

    @field_validator("freeze")
    @classmethod
    def _patterns_well_formed(cls, patterns: list[str]) -> list[str]:
        return _checked(patterns)

    @property
    def active(self) -> bool:
        """Whether this section changes the model before training: fewer parameters train,
        or the KL to the starting model is added."""
        return bool(self.freeze) or self.lora is not None or self.align is not None
