"""``finetune:`` applied to a model: LoRA adapters on the chosen linear layers, then which
parameters train (``requires_grad``); the optimizer only ever sees those; then the KL to the
starting model (``finetune.align``), whose reference copies the parameters that train. Also
the export of the adapter alone (``finetune.lora.merge: false``).

The pattern language (documented in :mod:`apt.core.config.finetune`) is matched here, against
the model's real names: a pattern is a run of dotted components that must appear, in order
and whole, inside a name; each component is a plain name, an fnmatch glob or an integer range
``a-b``; ``embeddings``/``head``/``layers`` stand for ``embed_tokens``/``lm_head``/``blocks``.
A pattern that matches nothing is a :class:`~apt.core.errors.ConfigError` listing real names.

Tied weights (``model.tie_embeddings``): ``lm_head.weight`` *is* ``embed_tokens.weight``, one
tensor with one ``requires_grad``, so freezing either name freezes both (a log line says so).
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from apt.core.config.finetune import NAME_ALIASES, RANGE, FinetuneAlignConfig, FinetuneConfig
from apt.core.config.model import AlignConfig
from apt.core.errors import ConfigError
from apt.model.architectures import APTModel
from apt.model.layers.align import AlignLoss
from apt.model.layers.lora import apply_lora, lora_modules, save_adapter
from apt.trainops.artifacts import ExportError

__all__ = [
    "FinetunePlan",
    "apply_finetune",
    "attach_align",
    "check_align_strategy",
    "export_adapter",
    "match_names",
    "pattern_matches",
]

log = logging.getLogger("apt")


def _component_matches(pattern: str, part: str) -> bool:
    found = RANGE.match(pattern)
    if found:
        return part.isdigit() and int(found.group(1)) <= int(part) <= int(found.group(2))
    return fnmatchcase(part, NAME_ALIASES.get(pattern, pattern))


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether ``pattern``'s components appear, consecutive and whole, in dotted ``name``:
    ``layers.0-1`` matches ``blocks.1.attn.q_proj.weight``; ``attn_norm`` matches every
    block's ``attn_norm.weight``; ``norm`` only the final ``norm.weight``."""
    wanted, parts = pattern.split("."), name.split(".")
    n = len(wanted)
    return any(
        all(_component_matches(w, p) for w, p in zip(wanted, parts[i : i + n], strict=True))
        for i in range(len(parts) - n + 1)
    )


def _examples(names: list[str], limit: int = 12) -> str:
    """The shapes of ``names``, block indices folded: ``blocks.N.attn.q_proj.weight (N =
    0-11)``: every kind of name once, whatever the depth."""
    shapes: dict[str, None] = {}
    indices: set[int] = set()
    for name in names:
        parts = name.split(".")
        indices.update(int(p) for p in parts if p.isdigit())
        shapes[".".join("N" if p.isdigit() else p for p in parts)] = None
    shown = list(shapes)[:limit]
    text = ", ".join(shown) + (f", ... ({len(shapes)} kinds)" if len(shapes) > limit else "")
    return text + (f" (N = {min(indices)}-{max(indices)})" if indices else "")


def match_names(patterns: list[str], names: list[str], *, key: str) -> dict[str, list[str]]:
    """Each pattern's matching names (in ``names`` order).

    Raises:
        ConfigError: a pattern matches none of ``names`` (the message names ``key`` and lists
            real names).
    """
    matched = {p: [n for n in names if pattern_matches(p, n)] for p in patterns}
    empty = [p for p, hits in matched.items() if not hits]
    if empty:
        raise ConfigError(
            f"{key}: {', '.join(map(repr, empty))} match{'es' if len(empty) == 1 else ''} no "
            f"name of this model. Its names: "
            f"{_examples(names)}. Patterns are dotted components matched whole (globs * ?, "
            "ranges 'blocks.0-5', aliases embeddings/head/layers); see docs/finetuning.md."
        )
    return matched


@dataclass
class FinetunePlan:
    """What :func:`apply_finetune` did.

    Attributes:
        adapted: the modules that got LoRA adapters.
        frozen: the parameter names frozen (tied names included).
        trainable_base: base (non-adapter) parameter names that train beside adapters.
        trainable: parameters that train (each tensor counted once).
        total: all parameters (each tensor counted once).
        reference: the parameter names the ``finetune.align`` reference copies (empty without
            it); the frozen ones stand for themselves.
        reference_values: values those copies hold.
    """

    adapted: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    trainable_base: list[str] = field(default_factory=list)
    trainable: int = 0
    total: int = 0
    reference: list[str] = field(default_factory=list)
    reference_values: int = 0

    def summary(self) -> str:
        """One line: how much trains, and why the rest does not."""
        share = 100 * self.trainable / max(self.total, 1)
        parts = [f"{self.trainable:,} of {self.total:,} parameters train ({share:.2f}%)"]
        if self.adapted:
            parts.append(f"LoRA adapters on {len(self.adapted)} linear layers")
        if self.frozen:
            parts.append(f"{len(self.frozen)} parameter tensors frozen")
        if self.reference:
            parts.append(
                f"KL to the starting model (reference: {self.reference_values:,} values copied)"
            )
        return "; ".join(parts)


def _set_trainable(model: nn.Module, names: set[str], value: bool) -> None:
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in names:
            param.requires_grad_(value)


def _tie_notes(model: nn.Module, names: set[str]) -> list[str]:
    """``a is b`` for each frozen parameter that shares its tensor with another name."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    groups = by_tensor.values()
    return [" is ".join(group) for group in groups if len(group) > 1 and names & set(group)]


def apply_finetune(cfg: FinetuneConfig, *, model: nn.Module) -> FinetunePlan:
    """Add ``cfg.lora``'s adapters to ``model`` (in place, before it is wrapped, sharded or
    compiled), then freeze: with LoRA every base parameter but ``cfg.lora.trainable``; then
    every parameter ``cfg.freeze`` names (adapters too); then, with ``cfg.align``, take the
    model as it now is as the KL reference (:func:`attach_align`).

    Raises:
        ConfigError: a pattern matches nothing, a LoRA target is tied or no linear layer,
            nothing is left to train, or ``cfg.align`` is set for a model that cannot have it.
    """
    plan = FinetunePlan()
    if cfg.lora is not None:
        lora = cfg.lora
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        hits = match_names(lora.targets, linears, key="finetune.lora.targets")
        chosen = {n for names in hits.values() for n in names}
        plan.adapted = apply_lora(
            model,
            targets=[n for n in linears if n in chosen],
            rank=lora.rank,
            alpha=lora.alpha,
            dropout=lora.dropout,
            rslora=lora.rslora,
        )
        adapters = {f"{m}.{k}" for m in lora_modules(model) for k in ("lora_A", "lora_B")}
        names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        base = [n for n in names if n not in adapters]
        kept = match_names(lora.trainable, base, key="finetune.lora.trainable")
        plan.trainable_base = [n for n in base if any(n in hit for hit in kept.values())]
        _set_trainable(model, set(base), False)
        _set_trainable(model, set(plan.trainable_base), True)
    if cfg.freeze:
        names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        hits = match_names(cfg.freeze, names, key="finetune.freeze")
        frozen = {n for group in hits.values() for n in group}
        _set_trainable(model, frozen, False)
        for note in _tie_notes(model, frozen):
            log.info("finetune.freeze: %s (tied weights), so both are frozen", note)
    params = {id(p): p for p in model.parameters()}.values()
    named = model.named_parameters(remove_duplicate=False)
    plan.frozen = [n for n, p in named if not p.requires_grad]
    plan.trainable_base = [n for n in plan.trainable_base if n not in plan.frozen]
    plan.total = sum(p.numel() for p in params)
    plan.trainable = sum(p.numel() for p in params if p.requires_grad)
    if plan.trainable == 0:
        raise ConfigError(
            "finetune: no parameter is left to train (finetune.freeze matches every trainable "
            "one). To fix: freeze fewer patterns."
        )
    if cfg.align is not None:
        reference = attach_align(cfg.align, model=model).reference()
        plan.reference = list(reference)
        plan.reference_values = sum(t.numel() for t in reference.values())
    log.info("finetune: %s", plan.summary())
    return plan


def check_align_strategy(
    cfg: FinetuneConfig, *, model: nn.Module, strategy: str, sharded: bool
) -> None:
    """Refuse an align KL (``finetune.align``, or ``model.align`` of an APT model) where its
    reference forward would be wrong: with sharded parameters (FSDP, tensor parallel,
    pipeline stages) the strategy's own unsharding, not the reference tensors, decides what
    the reference forward computes (measured for finetune.align under FSDP on 2 ranks: the
    losses leave a single process's at the second step, by 2.6%; model.align runs the same
    reference forward).

    Raises:
        ConfigError: an align KL is on and the strategy shards the parameters.
    """
    if not sharded:
        return
    on = [
        key
        for key, present in (
            ("finetune.align", cfg.align is not None),
            ("model.align", isinstance(model, APTModel) and model.config.align is not None),
        )
        if present
    ]
    if on:
        key = on[0]
        raise ConfigError(
            f"{key}: the KL to the reference model cannot train under "
            f"training.distributed.strategy {strategy}, which shards the parameters (the "
            "reference forward would not see the reference weights). To fix: use strategy "
            f"single or ddp, or remove {key}."
        )


def attach_align(cfg: FinetuneAlignConfig, *, model: nn.Module) -> AlignLoss:
    """Switch on ``loss_weight * KL(model || model now)`` (the model's ``align_kl`` loss) with
    the model as it is now as the reference: after LoRA and freezing, before the first step.
    The reference copies the parameters that train; a checkpoint holds it, so a resumed run
    loads it back instead of taking a new one. Returns the model's align module.

    Raises:
        ConfigError: ``model`` is not an APT model, or it has ``model.align`` already.
    """
    if not isinstance(model, APTModel):
        raise ConfigError(
            f"finetune.align: the KL to the starting model is computed by an APT model's "
            f"forward (APTModel and its subclasses); this model is a {type(model).__name__}. "
            "To fix: remove finetune.align, or fine-tune an APTModel (unwrapped: not "
            "torch.compile'd or wrapped)."
        )
    if model.align is not None:
        raise ConfigError(
            "finetune.align: the model has model.align already, an align loss with its own "
            "reference and switch (model.align.enabled, schedules). To fix: remove "
            "finetune.align and use model.align, or start from a model saved without "
            "model.align."
        )
    return model.attach_align(AlignConfig(enabled=True, loss_weight=cfg.loss_weight))


def export_adapter(
    model: nn.Module,
    target: Path,
    *,
    trainable: list[str],
    state: dict[str, torch.Tensor] | None = None,
    step: int | None = None,
) -> Path:
    """Write ``model``'s adapters (and the base parameters in ``trainable``) into ``target``
    (:func:`~apt.model.layers.lora.save_adapter`).

    Raises:
        ExportError: a file could not be written (disk full, permission denied).
    """
    try:
        return save_adapter(model, target, trainable=trainable, state=state)
    except (OSError, SafetensorError) as exc:
        what = "the adapter" if step is None else f"the adapter of step {step}"
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        raise ExportError(
            f"could not export {what} to {target}: {exc}. "
            + ("Free space, or set artifacts.output_dir on a larger disk." if full else ""),
            path=target,
            disk_full=full,
        ) from None
