"""Building blocks of the APT models."""

from apt.model.layers.align import AlignLoss, kl_divergence
from apt.model.layers.attention import CausalSelfAttention, KVCache
from apt.model.layers.lora import (
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    load_adapter,
    lora_modules,
    merge_lora,
    merged_state_dict,
    save_adapter,
)
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
    "LoRALinear",
    "MoEAux",
    "MoEFeedForward",
    "ModuleGroup",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "Switchable",
    "Voter",
    "adapter_state_dict",
    "apply_lora",
    "apply_rope",
    "entropy",
    "kl_divergence",
    "load_adapter",
    "lora_modules",
    "merge_lora",
    "merged_state_dict",
    "save_adapter",
]
