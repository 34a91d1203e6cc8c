"""How :class:`APTModel` splits under tensor parallelism, declared as data next to the model.

The model itself never knows it is sharded: ``apt.trainops`` reads :data:`APT_TENSOR_PLAN` and
turns it into ``torch.distributed.tensor.parallel`` calls (``apply_tp``). Styles:

* ``colwise``: a Linear whose output features are split (q/k/v, gate/up): each rank computes
  its own heads / its own slice of the MLP width from the whole input.
* ``rowwise``: a Linear whose input features are split (o_proj, down_proj): each rank's partial
  product is summed over the ranks, so the residual stream leaves the block whole.
* ``vocab``: split along the vocabulary: the embedding looks up the ids its rank holds (the
  others contribute zeros, summed); the output head computes its rank's logits, and the
  cross-entropy runs over the shards (loss parallel) without gathering (B, T, V).

Parameters the plan does not name (norms, the MoE router and experts) stay whole on every
rank; their gradients are the same on every rank because each split region gathers its
input gradient. A parameter tied to another (the head to the embedding) is tied again after
both are split.

Sequence parallelism (:class:`SequencePlan`) also splits what lies between the split regions
along the sequence: the ``sharded`` modules (norms, dropout) run on T / tp positions per rank,
the ``gathered`` regions (attention, the MLP) all-gather their input to the whole sequence,
and their row-parallel outputs (and the embedding's) are reduce-scattered back to sequence
shards instead of all-reduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["APT_TENSOR_PLAN", "SequencePlan", "TensorPlan", "TensorStyle"]

TensorStyle = Literal["colwise", "rowwise", "vocab"]


@dataclass(frozen=True)
class SequencePlan:
    """Where a model's activations are sequence shards under sequence parallelism.

    Attributes:
        sharded: module name patterns that run on this rank's positions (B, T / tp, D): norms
            (their weights replicated) and dropout. Each must be position-wise.
        gathered: module name patterns whose first input is all-gathered to the whole
            sequence (B, T, D) before they run (attention sees every position, RoPE and the
            document mask apply unchanged); each must end in a ``rowwise`` layer of the plan,
            whose output goes back to sequence shards.
    """

    sharded: tuple[str, ...]
    gathered: tuple[str, ...]


@dataclass(frozen=True)
class TensorPlan:
    """A model's tensor-parallel plan.

    Attributes:
        layers: module name pattern (``*`` matches one name part, e.g. a block index) ->
            style. Each named module must be an ``nn.Linear`` (or ``nn.Embedding`` for
            ``vocab``).
        heads: module name pattern -> the attributes that count attention heads; each must be
            divisible by the tensor-parallel degree, and becomes the local count.
        sequence: how the model runs under sequence parallelism; None: it cannot.
    """

    layers: dict[str, TensorStyle]
    heads: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sequence: SequencePlan | None = None


#: APTModel's plan (blocks: attention and dense SwiGLU; the embedding and tied head by vocab).
APT_TENSOR_PLAN = TensorPlan(
    layers={
        "embed_tokens": "vocab",
        "blocks.*.attn.q_proj": "colwise",
        "blocks.*.attn.k_proj": "colwise",
        "blocks.*.attn.v_proj": "colwise",
        "blocks.*.attn.o_proj": "rowwise",
        "blocks.*.mlp.gate_proj": "colwise",
        "blocks.*.mlp.up_proj": "colwise",
        "blocks.*.mlp.down_proj": "rowwise",
        "lm_head": "vocab",
    },
    heads={"blocks.*.attn": ("num_heads", "num_kv_heads")},
    sequence=SequencePlan(
        sharded=("blocks.*.attn_norm", "blocks.*.mlp_norm", "blocks.*.dropout", "norm"),
        gathered=("blocks.*.attn", "blocks.*.mlp"),
    ),
)
