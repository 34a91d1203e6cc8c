"""Mixture-of-experts feed-forward: token-choice top-k routing over SwiGLU experts.

Shapes: B batch, T positions, N = B*T tokens, D width, F expert width, E experts,
K experts per token (top_k), C capacity (tokens an expert accepts), A = K*N assignments.

Dispatch is static-shaped (no data-dependent sizes, so ``torch.compile`` traces it whole): each
assignment gets its rank within its expert by a cumulative sum, the first C of each expert are
gathered into an (E, C, D) batch, the experts run as three batched matmuls, and the outputs are
gathered back and weighted by the gates. First choices take priority over second choices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from apt.core.config.model import MoEConfig
from apt.model.layers.mlp import swiglu
from apt.model.layers.switch import Switchable

__all__ = ["Experts", "MoEAux", "MoEFeedForward", "upcycle_"]


class MoEAux(NamedTuple):
    """What one MoE layer reports besides its output (weighted losses, detached statistic)."""

    balance_loss: torch.Tensor  # aux_loss_weight * Switch load-balancing loss
    z_loss: torch.Tensor  # z_loss_weight * router z-loss
    overflow_fraction: torch.Tensor  # dropped assignments / all assignments, detached


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights, run as batched matmuls."""

    def __init__(self, num_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (E, C, D) -> (E, C, D)
        h = F.silu(torch.bmm(x, self.gate_proj)) * torch.bmm(x, self.up_proj)  # (E, C, F)
        return torch.bmm(h, self.down_proj)


def upcycle_(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Copy the dense MLP weights into every expert, in place (sparse upcycling).

    Works on any name -> tensor mapping laid out like :class:`MoEFeedForward` (its own
    parameters, or a reference copy of them), with names under ``prefix``.
    """
    with torch.no_grad():
        for proj in ("gate_proj", "up_proj", "down_proj"):
            dense = tensors[f"{prefix}{proj}.weight"]  # nn.Linear layout (out, in)
            tensors[f"{prefix}experts.{proj}"].copy_(dense.t())  # broadcast over E


class MoEFeedForward(Switchable):
    """A SwiGLU MLP that can turn into a top-k mixture of experts.

    Off, it is exactly the dense SwiGLU MLP (``gate_proj``/``up_proj``/``down_proj``, the same
    parameter names as a dense block, so dense checkpoints load into it). On the first switch-on
    every expert is initialised from the dense weights and, because the top-k gates are
    renormalised to sum to one, the layer's output does not change while no token overflows
    (``experts_ready`` records this, so loading a checkpoint never upcycles again). Built already
    on (``MoEConfig.enabled``), the experts keep their independent random init.

    While training, each expert accepts ``C = ceil(capacity_factor * N * K / E)`` assignments; the
    rest skip that expert (a token dropped by all its K experts keeps only the residual). In
    eval mode (evaluation and generation) routing is drop-free, so a token's output never depends
    on the other tokens in the batch and KV-cached decoding matches a full recompute.

    Args:
        cfg: the ``model.moe`` section.
        dim: model width D.
        hidden: expert (and dense MLP) width F.
    """

    experts_ready: torch.Tensor
    router_temperature: torch.Tensor
    aux_loss_weight: torch.Tensor
    z_loss_weight: torch.Tensor

    def __init__(self, cfg: MoEConfig, dim: int, hidden: int) -> None:
        super().__init__(
            cfg.enabled,
            router_temperature=cfg.router_temperature,
            capacity_factor=cfg.capacity_factor,
            aux_loss_weight=cfg.aux_loss_weight,
            z_loss_weight=cfg.z_loss_weight,
        )
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.router = nn.Linear(dim, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, dim, hidden)
        self.register_buffer("experts_ready", torch.tensor(cfg.enabled))

    def _on_enable(self) -> None:
        if not bool(self.experts_ready):
            upcycle_(dict(self.named_parameters()))
            self.experts_ready.fill_(True)

    def capacity(self, num_tokens: int) -> int:
        """Assignments each expert accepts from ``num_tokens`` tokens while training."""
        fair_share = num_tokens * self.top_k / self.num_experts
        return max(1, math.ceil(self.get_scalar("capacity_factor") * fair_share))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux | None]:  # x: (B, T, D)
        if not self.enabled:
            return swiglu(x, self.gate_proj, self.up_proj, self.down_proj), None
        B, T, D = x.shape
        N, E, K = B * T, self.num_experts, self.top_k
        xf = x.reshape(N, D)  # (N, D)

        # Routing in float32, outside autocast: softmax/top-k on bf16 logits flips near-ties.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(xf.float(), self.router.weight.float())  # (N, E)
            logits = logits / self.router_temperature
            probs = logits.softmax(dim=-1)  # (N, E)
        top_p, top_e = probs.topk(K, dim=-1)  # (N, K)
        # Gates sum to one per token (so upcycled experts reproduce the dense MLP). For K == 1
        # p / p.detach() is exactly 1 but still passes the router a gradient.
        gates = top_p / (top_p.sum(-1, keepdim=True) if K > 1 else top_p.detach())

        # Assignment a = k * N + n: all first choices rank before any second choice.
        expert_of = top_e.t().reshape(-1)  # (A,)
        token_of = torch.arange(N, device=x.device).repeat(K)  # (A,)
        gate_of = gates.t().reshape(-1)  # (A,)
        onehot = F.one_hot(expert_of, E)  # (A, E)
        rank = (onehot.cumsum(0) * onehot).sum(-1) - 1  # (A,) position inside its expert
        C = self.capacity(N) if self.training else N
        kept = rank < C  # (A,)
        slot = torch.where(kept, expert_of * C + rank, E * C)  # (A,) E*C = "dropped"

        # Gather: slot -> token (empty and dropped slots point at an all-zero row N).
        slot_token = torch.full((E * C + 1,), N, device=x.device, dtype=torch.long)
        slot_token = slot_token.scatter(0, slot, token_of)[: E * C]  # (E*C,)
        xs = F.pad(xf, (0, 0, 0, 1))[slot_token].view(E, C, D)  # (E, C, D)
        ys = self.experts(xs).reshape(E * C, D)  # (E*C, D)
        ys = F.pad(ys, (0, 0, 0, 1))  # (E*C + 1, D): dropped assignments read zeros
        out = (ys[slot] * gate_of.unsqueeze(-1).to(ys.dtype)).view(K, N, D).sum(0)  # (N, D)

        # Switch load balancing: E * sum_e (share of assignments to e) * (mean router prob of e);
        # 1.0 when balanced. z-loss keeps the router logits small.
        share = onehot.float().mean(0)  # (E,), sums to 1
        balance = E * (share * probs.mean(0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        overflow = (~kept).float().mean().detach()
        aux = MoEAux(self.aux_loss_weight * balance, self.z_loss_weight * z, overflow)
        return out.view(B, T, D), aux
