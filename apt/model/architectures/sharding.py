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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["APT_TENSOR_PLAN", "TensorPlan", "TensorStyle"]

TensorStyle = Literal["colwise", "rowwise", "vocab"]


@dataclass(frozen=True)
class TensorPlan:
    """A model's tensor-parallel plan.

    Attributes:
        layers: module name pattern (``*`` matches one name part, e.g. a block index) ->
            style. Each named module must be an ``nn.Linear`` (or ``nn.Embedding`` for
            ``vocab``).
        heads: module name pattern -> the attributes that count attention heads; each must be
            divisible by the tensor-parallel degree, and becomes the local count.
    """

    layers: dict[str, TensorStyle]
    heads: dict[str, tuple[str, ...]] = field(default_factory=dict)


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
)
