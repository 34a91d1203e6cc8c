"""``apply_tp``: a model's tensor-parallel plan turned into ``parallelize_module`` calls.

The plan is the model's own data (:class:`~apt.model.architectures.sharding.TensorPlan`); this
module maps each style to a ``torch.distributed.tensor.parallel`` style:

==========  ============================================================================
colwise     ``ColwiseParallel()``: whole input in, this rank's output features out
rowwise     ``RowwiseParallel()``: this rank's input features in, the summed output out
vocab       an ``nn.Embedding``: ``RowwiseParallel`` (rows are token ids), output whole;
            an ``nn.Linear`` head: ``ColwiseParallel`` with the logits left as a DTensor
            sharded along the vocabulary, for a loss-parallel cross-entropy
==========  ============================================================================

Local tensors flow between the split regions, so model code runs unchanged on its shard
once the head counts are the local ones.

With ``sequence=True`` (sequence parallelism) the plan's :class:`SequencePlan` applies too:

==========  ============================================================================
sharded     ``SequenceParallel()``: a norm (weight replicated) or dropout on this rank's
            positions (B, T / tp, D)
gathered    the first input all-gathered along the sequence (a replicated DTensor, so its
            gradient is reduce-scattered once for q, k and v together)
rowwise     ``RowwiseParallel(output_layouts=Shard(1))``: reduce-scatter, not all-reduce
vocab       the embedding's output reduce-scattered to sequence shards; the head all-gathers
            the final norm's shards
==========  ============================================================================
"""

from __future__ import annotations

import re
from functools import partial
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ParallelStyle

from apt.core.errors import ConfigError, DistributedError
from apt.model.architectures import APTModel
from apt.model.architectures.sharding import APT_TENSOR_PLAN, TensorPlan

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["apply_tp", "tensor_plan_of"]


def tensor_plan_of(model: nn.Module) -> TensorPlan:
    """The model's tensor-parallel plan: its ``tensor_plan`` attribute, or APTModel's.

    Raises:
        DistributedError: the model declares none.
    """
    declared = getattr(model, "tensor_plan", None)
    if isinstance(declared, TensorPlan):
        return declared
    if isinstance(model, APTModel):
        return APT_TENSOR_PLAN
    raise DistributedError(
        f"strategy tensor needs the model's tensor-parallel plan, and {type(model).__name__} "
        "declares none: give it a `tensor_plan` attribute (a "
        "apt.model.architectures.sharding.TensorPlan), or use strategy ddp or fsdp."
    )


def _matches(pattern: str, name: str) -> bool:
    regex = "[^.]+".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, name) is not None


def _named(model: nn.Module, patterns: dict[str, Any]) -> list[tuple[str, nn.Module, Any]]:
    """(name, module, value) of every module some pattern names, in module order."""
    found = [
        (name, module, value)
        for name, module in model.named_modules()
        for pattern, value in patterns.items()
        if _matches(pattern, name)
    ]
    return found


def _check_heads(model: nn.Module, plan: TensorPlan, tp: int) -> list[tuple[nn.Module, str]]:
    """The (module, attribute) head counts to divide by ``tp``, after checking they divide."""
    counts = [
        (name, module, attr) for name, module, attrs in _named(model, plan.heads) for attr in attrs
    ]
    bad = {
        f"{attr} {getattr(module, attr)}"
        for _, module, attr in counts
        if int(getattr(module, attr)) % tp
    }
    if bad:
        raise ConfigError(
            f"training.distributed: tensor parallelism over tp {tp} splits the attention "
            f"heads, but {' and '.join(sorted(bad))} (model.num_heads / model.num_kv_heads) "
            f"{'is' if len(bad) == 1 else 'are'} not divisible by {tp}. Choose a head count "
            f"divisible by {tp}, or another tp."
        )
    return [(module, attr) for _, module, attr in counts]


def _style(name: str, module: nn.Module, style: str, *, sequence: bool) -> Any:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    # Between the split regions: the whole sequence on every rank, or this rank's positions.
    between = Shard(1) if sequence else Replicate()
    if style == "vocab" and isinstance(module, nn.Embedding):
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=between)
    if not isinstance(module, nn.Linear):
        raise DistributedError(
            f"strategy tensor: the plan splits {name} ({style}), which is a "
            f"{type(module).__name__}, not an nn.Linear; tensor parallelism cannot split it "
            "(finetune.lora and training.float8 replace the model's linears: use them with "
            "ddp or fsdp)."
        )
    if style == "vocab":
        # The logits stay sharded along the vocabulary: the loss reads them where they are.
        return ColwiseParallel(
            input_layouts=between, output_layouts=Shard(-1), use_local_output=False
        )
    if style == "colwise":
        return ColwiseParallel()
    if style == "rowwise":
        return RowwiseParallel(output_layouts=between)
    raise DistributedError(f"strategy tensor: unknown style {style!r} for {name}")


def apply_tp(
    model: nn.Module,
    *,
    tp_mesh: DeviceMesh,
    plan: TensorPlan | None = None,
    sequence: bool = False,
) -> bool:
    """Split ``model`` over ``tp_mesh`` as its plan says (in place); returns whether the
    logits come out sharded along the vocabulary (then the loss must be loss-parallel).
    ``sequence``: sequence parallelism too (the plan's ``sequence``; inputs of T positions,
    T divisible by the tp degree).

    Raises:
        ConfigError: a head count is not divisible by the tensor-parallel degree.
        DistributedError: the model has no plan (or, with ``sequence``, no sequence plan), or
            the plan names a module that cannot split.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    plan = plan or tensor_plan_of(model)
    tp = tp_mesh.size()
    heads = _check_heads(model, plan, tp)
    ties: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        ties.setdefault(id(param), []).append(name)
    layers = _named(model, plan.layers)
    vocab_head = False
    styles = {}
    for name, module, style in layers:
        styles[name] = _style(name, module, style, sequence=sequence)
        vocab_head |= style == "vocab" and isinstance(module, nn.Linear)
    sequence_styles: dict[str, Any] = {}
    if sequence:
        rowwise = [name for name, _, style in layers if style == "rowwise"]
        sequence_styles = _sequence_styles(model, plan, rowwise=rowwise)
    parallelize_module(model, tp_mesh, {**styles, **sequence_styles})
    for name in sequence_styles:
        for param in model.get_submodule(name).parameters():
            param.register_post_accumulate_grad_hook(_sum_partial_grad)
    for module, attr in heads:  # attention now sees its own heads only
        setattr(module, attr, int(getattr(module, attr)) // tp)
    _tie_again(model, [names for names in ties.values() if len(names) > 1])
    return vocab_head


def _sequence_styles(model: nn.Module, plan: TensorPlan, *, rowwise: list[str]) -> dict[str, Any]:
    """The styles of the plan's sequence-sharded modules and gathered regions."""
    from torch.distributed.tensor.parallel import SequenceParallel

    if plan.sequence is None:
        raise DistributedError(
            f"sequence parallelism needs the model's plan to say where the sequence is split "
            f"(TensorPlan.sequence), and {type(model).__name__}'s says nothing; use strategy "
            "tensor, or give the plan a SequencePlan."
        )
    styles: dict[str, Any] = {}
    for name, module, _ in _named(model, dict.fromkeys(plan.sequence.sharded)):
        if isinstance(module, nn.Dropout) and module.p == 0:
            continue  # the identity: nothing to run on shards
        # Local tensors out: the residual stream is the plain (B, T / tp, D) shard.
        styles[name] = SequenceParallel(use_local_output=True)
    split = {name for name, _, _ in _named(model, plan.layers)}
    for name, module, _ in _named(model, dict.fromkeys(plan.sequence.gathered)):
        # Everything inside must be split by the plan, so that the region's output leaves
        # through a row-parallel layer (reduce-scattered back to the shards); anything else
        # (an MoE layer's router and experts) would return the whole sequence.
        unsplit = [
            f"{name}.{param}"
            for param, _ in module.named_parameters()
            if f"{name}.{param.rpartition('.')[0]}" not in split
        ]
        if unsplit or not any(layer.startswith(f"{name}.") for layer in rowwise):
            what = ", ".join(unsplit[:3]) or "and no row-parallel output"
            raise DistributedError(
                f"sequence parallelism: {name} ({type(module).__name__}) holds parameters the "
                f"tensor plan does not split ({what}), which would run on the whole gathered "
                "sequence (an MoE layer's router and experts do); use strategy tensor for "
                "this model."
            )
        styles[name] = _GatherSequence()
    return styles


def _sum_partial_grad(param: Any) -> None:
    """A sequence-sharded norm's weight is replicated, but its gradient comes out of backward
    as each rank's partial sum over its own positions (``Partial``): sum it over the tp ranks
    once here, so the optimizer, the norm and a gathering reader see the whole gradient
    (otherwise every op that reads it would all-reduce it again). FSDP (strategy hybrid) does
    this itself and replaces the parameter, so this hook never runs there."""
    grad = param.grad
    if isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements):
        param.grad = grad.redistribute(grad.device_mesh, param.placements)


def _gather_first(mesh: DeviceMesh, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: the first argument, this rank's positions, as the whole sequence."""
    x, *rest = args
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, (Shard(1),), run_check=False)
    # Left a DTensor: the column-parallel layers inside take it as their replicated input,
    # and their input gradients are summed before one reduce-scatter back to the shards.
    return (x.redistribute(mesh, (Replicate(),)), *rest)


class _GatherSequence(ParallelStyle):
    """All-gather a module's first input along the sequence (dim 1) before it runs; the other
    arguments (RoPE tables, the document mask, caches) pass as they are. torch's
    ``PrepareModuleInput`` needs a layout for every positional argument, which ties the plan
    to each call site's argument count."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module.register_forward_pre_hook(partial(_gather_first, device_mesh))
        return module


def _tie_again(model: nn.Module, tied: list[list[str]]) -> None:
    """Point every name of a tied group at the first one's (split) parameter again:
    splitting replaced each module's parameter with a new one."""
    for names in tied:
        first = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            other = model.get_parameter(name)
            placements = (getattr(first, "placements", None), getattr(other, "placements", None))
            if placements[0] != placements[1]:
                raise DistributedError(
                    f"strategy tensor: {names[0]} and {name} are one tied parameter but the "
                    f"plan splits them differently ({placements[0]} vs {placements[1]}); give "
                    "both the same style."
                )
            setattr(model.get_submodule(owner), attr, first)
