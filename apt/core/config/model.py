"""``model:`` — what the network is. Read by :func:`apt.model.build_model`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, model_validator

from apt.core.config.base import Section
from apt.core.config.resume import FREE
from apt.core.config.schedules import SCHEDULABLE

__all__ = [
    "PRESETS",
    "AlignConfig",
    "MoEConfig",
    "ModelConfig",
    "RopeScalingConfig",
    "VoterConfig",
]

#: The config block that builds each switchable module.
_MODULE_BLOCKS = {"moe": "moe", "router": "moe", "align": "align", "voter": "voter"}

#: Named sizes. Keys set explicitly next to ``preset`` win over the preset's values.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "max_seq_len": 256},
    "small": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "max_seq_len": 1024},
    "base": {"hidden_size": 1024, "num_layers": 24, "num_heads": 16, "max_seq_len": 2048},
    "large": {
        "hidden_size": 2048,
        "num_layers": 32,
        "num_heads": 32,
        "num_kv_heads": 8,
        "max_seq_len": 4096,
    },
}


class MoEConfig(Section):
    """Mixture-of-experts feed-forward layers (token-choice top-k routing)."""

    resume = "critical"  # another network is another run

    enabled: bool = Field(
        False,
        validation_alias=AliasChoices("enabled", "use_moe"),
        description="Start with the MoE layers switched on. When false the layers act as the "
        "dense SwiGLU MLP until a schedule (enable_moe_at_epoch) switches them on.",
    )
    num_experts: int = Field(8, ge=2, description="Experts per MoE layer.")
    top_k: int = Field(2, ge=1, description="Experts each token is routed to.")
    capacity_factor: float = Field(
        1.25,
        gt=0,
        description="Tokens an expert accepts, as a multiple of its fair share "
        "(tokens * top_k / num_experts). Tokens over capacity skip the expert (residual only).",
    )
    router_temperature: float = Field(1.0, gt=0, description="Softmax temperature of the router.")
    aux_loss_weight: float = Field(0.01, ge=0, description="Weight of the load-balancing loss.")
    z_loss_weight: float = Field(0.001, ge=0, description="Weight of the router z-loss.")
    every_n_layers: int = Field(1, ge=1, description="Use MoE in every n-th block (1 = all).")

    @model_validator(mode="after")
    def _top_k_fits(self) -> MoEConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        return self


class AlignConfig(Section):
    """Auxiliary KL loss towards a frozen reference copy of the model."""

    resume = "critical"  # another network is another run

    enabled: bool = Field(False, description="Start with the align loss switched on.")
    loss_weight: float = Field(0.1, ge=0, description="Weight of the KL(model || reference) loss.")


class VoterConfig(Section):
    """Self-consistency voting at high-entropy positions, used at evaluation and generation."""

    resume = "critical"  # another network is another run

    enabled: bool = Field(False, description="Start with voting switched on.")
    entropy_threshold: float = Field(
        2.2, ge=0, description="Vote at positions whose next-token entropy (nats) exceeds this."
    )
    num_samples: int = Field(5, ge=2, description="Samples drawn per vote.")


class RopeScalingConfig(Section):
    """RoPE frequency scaling, for a context longer than the one the model was trained on.

    ``kind: llama3`` is Llama 3.1's: wavelengths shorter than ``original_max_seq_len /
    high_freq_factor`` are kept, those longer than ``original_max_seq_len / low_freq_factor``
    are stretched by ``factor``, and the band between blends the two linearly in
    ``original_max_seq_len / wavelength``.
    """

    resume = "critical"  # other frequencies are another network

    kind: Literal["llama3"] = Field(
        "llama3", description="The scaling rule; llama3 is the one APT computes."
    )
    factor: float = Field(gt=0, description="Divides the low frequencies (8 in Llama 3.1).")
    low_freq_factor: float = Field(
        1.0,
        gt=0,
        description="Wavelengths over original_max_seq_len / low_freq_factor are divided by "
        "factor in full (1 in Llama 3.1).",
    )
    high_freq_factor: float = Field(
        4.0,
        gt=0,
        description="Wavelengths under original_max_seq_len / high_freq_factor are kept as "
        "they are; must exceed low_freq_factor (4 in Llama 3.1).",
    )
    original_max_seq_len: int = Field(
        ge=1,
        description="The context length the unscaled model was trained on (8192 in Llama 3.1).",
    )

    @model_validator(mode="after")
    def _band_is_ordered(self) -> RopeScalingConfig:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"high_freq_factor ({self.high_freq_factor}) must exceed low_freq_factor "
                f"({self.low_freq_factor}): they bound the band that blends the frequencies"
            )
        return self


class ModelConfig(Section):
    """A decoder-only causal language model (RoPE, RMSNorm, SwiGLU, tied head)."""

    resume = "critical"  # another network is another run

    preset: Literal["tiny", "small", "base", "large"] | None = Field(
        None, description="Named size; keys given next to it override the preset's values."
    )
    vocab_size: Annotated[int, Field(ge=2)] | Literal["auto"] = Field(
        256,
        description="Embedding rows; >= the tokenizer's size. auto: the tokenizer's size "
        "rounded up to a multiple of 64 (set when the run starts).",
    )
    hidden_size: int = Field(256, ge=8, description="Width of the residual stream.")
    num_layers: int = Field(4, ge=1, description="Transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention (query) heads.")
    num_kv_heads: int | None = Field(
        None, ge=1, description="Key/value heads for grouped-query attention (default: num_heads)."
    )
    intermediate_size: int | None = Field(
        None,
        ge=1,
        description="SwiGLU hidden width (default: 8/3 * hidden_size, rounded up to 64).",
    )
    max_seq_len: int = Field(256, ge=1, description="Longest sequence (RoPE table and KV cache).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on attention and MLP outputs.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")
    rope_scaling: RopeScalingConfig | None = Field(
        None, description="Scale the RoPE frequencies (absent: plain RoPE)."
    )
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon.")
    document_attention: Literal["auto", "mask", "varlen", "flex"] = Field(
        "auto",
        json_schema_extra=FREE,
        description="The kernel of attention inside the documents of packed rows (the same "
        "maths; free across a resume): mask (SDPA with a dense block-causal mask, T^2 a row), "
        "varlen (SDPA on each document alone, sum of L^2), flex (FlexAttention, block-sparse; "
        "CUDA for training, no dropout) or auto (flex on CUDA, varlen elsewhere).",
    )
    tie_embeddings: bool = Field(True, description="Share the token embedding and output head.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal weight initialisation.")
    moe: MoEConfig | None = Field(None, description="Build MoE layers (absent: dense only).")
    align: AlignConfig | None = Field(None, description="Build the align loss module.")
    voter: VoterConfig | None = Field(None, description="Build the voter module.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _heads_fit(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.kv_heads})"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("the head size (hidden_size / num_heads) must be even for RoPE")
        if self.moe is not None and self.moe.every_n_layers > self.num_layers:
            raise ValueError(
                f"moe.every_n_layers ({self.moe.every_n_layers}) exceeds num_layers "
                f"({self.num_layers}): no block would hold an MoE layer"
            )
        return self

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used."""
        return self.num_kv_heads or self.num_heads

    @property
    def mlp_hidden_size(self) -> int:
        """SwiGLU hidden width actually used."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        return -(-(8 * self.hidden_size // 3) // 64) * 64

    def controllable_modules(self) -> list[str]:
        """Names of the switchable modules this config builds (``moe`` and ``router`` both
        come with ``model.moe``)."""
        return [name for name, block in _MODULE_BLOCKS.items() if getattr(self, block) is not None]

    def schedulable_attributes(self) -> list[str]:
        """Dotted ``module.attribute`` names a schedule may anneal (from :data:`SCHEDULABLE`)."""
        return [
            f"{module}.{attr}"
            for module in SCHEDULABLE
            if module in self.controllable_modules()
            for attr in SCHEDULABLE[module]
        ]
