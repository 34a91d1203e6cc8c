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
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from torch import nn

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


def _style(name: str, module: nn.Module, style: str) -> Any:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if style == "vocab" and isinstance(module, nn.Embedding):
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if not isinstance(module, nn.Linear):
        raise DistributedError(
            f"strategy tensor: the plan splits {name} ({style}), which is a "
            f"{type(module).__name__}, not an nn.Linear; tensor parallelism cannot split it "
            "(finetune.lora and training.float8 replace the model's linears: use them with "
            "ddp or fsdp)."
        )
    if style == "vocab":
        # The logits stay sharded along the vocabulary: the loss reads them where they are.
        return ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    if style == "colwise":
        return ColwiseParallel()
    if style == "rowwise":
        return RowwiseParallel()
    raise DistributedError(f"strategy tensor: unknown style {style!r} for {name}")


def apply_tp(model: nn.Module, *, tp_mesh: DeviceMesh, plan: TensorPlan | None = None) -> bool:
    """Split ``model`` over ``tp_mesh`` as its plan says (in place); returns whether the
    logits come out sharded along the vocabulary (then the loss must be loss-parallel).

    Raises:
        ConfigError: a head count is not divisible by the tensor-parallel degree.
        DistributedError: the model has no plan, or the plan names a module that cannot split.
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
        styles[name] = _style(name, module, style)
        vocab_head |= style == "vocab" and isinstance(module, nn.Linear)
    parallelize_module(model, tp_mesh, styles)
    for module, attr in heads:  # attention now sees its own heads only
        setattr(module, attr, int(getattr(module, attr)) // tp)
    _tie_again(model, [names for names in ties.values() if len(names) > 1])
    return vocab_head


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
