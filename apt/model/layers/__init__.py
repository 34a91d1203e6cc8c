"""Building blocks of the APT models."""

from apt.model.layers.align import AlignLoss, kl_divergence
from apt.model.layers.attention import CausalSelfAttention, KVCache
from apt.model.layers.mlp import SwiGLU
from apt.model.layers.moe import Experts, MoEAux, MoEFeedForward
from apt.model.layers.norm import RMSNorm
from apt.model.layers.rope import RotaryEmbedding, apply_rope
from apt.model.layers.switch import Controllable, ModuleGroup, Switchable
from apt.model.layers.voter import Voter, entropy

__all__ = [
    "AlignLoss",
    "CausalSelfAttention",
    "Controllable",
    "Experts",
    "KVCache",
    "MoEAux",
    "MoEFeedForward",
    "ModuleGroup",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "Switchable",
    "Voter",
    "apply_rope",
    "entropy",
    "kl_divergence",
]
