"""The Llama format of Hugging Face ``transformers``: its ``config.json`` and tensor names, and
which of its configs describe exactly the network APT computes.

APT's block is Llama's (pre-norm RMSNorm, grouped-query attention with "rotate half" RoPE,
SwiGLU, no biases), so the conversion only renames tensors; no matrix is permuted or split:

    APT                                      LlamaForCausalLM
    embed_tokens.weight                      model.embed_tokens.weight
    blocks.N.attn_norm.weight                model.layers.N.input_layernorm.weight
    blocks.N.attn.{q,k,v,o}_proj.weight      model.layers.N.self_attn.{q,k,v,o}_proj.weight
    blocks.N.mlp_norm.weight                 model.layers.N.post_attention_layernorm.weight
    blocks.N.mlp.{gate,up,down}_proj.weight  model.layers.N.mlp.{gate,up,down}_proj.weight
    norm.weight                              model.norm.weight
    lm_head.weight                           lm_head.weight (written only when untied)

A config is read with the defaults of its ``transformers`` class for the keys it leaves out, and
refused (:class:`InteropError`, naming the key) where the math would differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from apt.core.config.model import ModelConfig, RopeScalingConfig
from apt.model.interop.errors import InteropError

__all__ = [
    "ACCEPTED_MODEL_TYPES",
    "DERIVED_TENSORS",
    "apt_config",
    "hf_config",
    "hf_names",
    "hf_shapes",
]

#: The ``model_type`` values imported: Mistral is Llama's math plus a sliding window, accepted
#: when the window is off or longer than every sequence the model takes.
ACCEPTED_MODEL_TYPES = ("llama", "mistral")

#: Tensor-name suffixes an older checkpoint may hold that are derived, not learnt (RoPE
#: frequencies); skipped on import.
DERIVED_TENSORS = ("rotary_emb.inv_freq",)

#: Why a Llama-like model_type is not the same network (for the refusal message).
_DIFFERENCES = {
    "qwen2": "its attention has q/k/v biases (APT's projections have none)",
    "qwen2_moe": "its feed-forward layers are mixtures of experts and its q/k/v have biases",
    "qwen3": "its attention normalises queries and keys per head (q_norm, k_norm)",
    "mixtral": "its feed-forward layers are mixtures of experts",
    "gemma": "its RMSNorm scales by (1 + weight), it multiplies the embeddings by "
    "sqrt(hidden_size) and its MLP uses GELU",
    "gemma2": "its RMSNorm scales by (1 + weight), it has extra norms around each sublayer and "
    "soft-caps the logits",
    "gemma3": "its RMSNorm scales by (1 + weight) and it normalises queries and keys",
    "phi3": "it stores q/k/v and gate/up as fused matrices and may rotate part of each head",
    "olmo2": "it normalises queries and keys and places its norms after the sublayers",
    "gpt2": "it has learnt position embeddings, LayerNorm with biases and a GELU MLP",
}

#: The defaults of transformers' config classes for the keys a config may leave out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "initializer_range": 0.02,
    },
    "mistral": {
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "sliding_window": 4096,
    },
}
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
#: Activations transformers computes as ``x * sigmoid(x)`` (its ACT2FN maps both to SiLU).
_SILU = ("silu", "swish")
#: The keys of a ``rope_type: llama3`` block transformers requires, with APT's name for each
#: (``original_max_position_embeddings`` defaults to ``max_position_embeddings``).
_LLAMA3_KEYS = {
    "factor": "factor",
    "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor",
    "original_max_position_embeddings": "original_max_seq_len",
}


def hf_names(cfg: ModelConfig) -> dict[str, str]:
    """APT tensor name -> Llama tensor name, for every tensor the Llama folder stores (without
    ``lm_head.weight`` when the head is tied to the embedding)."""
    names = {"embed_tokens.weight": "model.embed_tokens.weight"}
    for i in range(cfg.num_layers):
        apt, hf = f"blocks.{i}.", f"model.layers.{i}."
        names[f"{apt}attn_norm.weight"] = f"{hf}input_layernorm.weight"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{apt}attn.{proj}.weight"] = f"{hf}self_attn.{proj}.weight"
        names[f"{apt}mlp_norm.weight"] = f"{hf}post_attention_layernorm.weight"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{apt}mlp.{proj}.weight"] = f"{hf}mlp.{proj}.weight"
    names["norm.weight"] = "model.norm.weight"
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Llama tensor name -> its shape, for the model ``cfg`` describes (computed, nothing built)."""
    assert cfg.vocab_size != "auto"
    D, V, F = cfg.hidden_size, cfg.vocab_size, cfg.mlp_hidden_size
    Dh = D // cfg.num_heads
    q, kv = cfg.num_heads * Dh, cfg.kv_heads * Dh
    by_suffix = {
        "embed_tokens.weight": (V, D),
        "layernorm.weight": (D,),
        "q_proj.weight": (q, D),
        "k_proj.weight": (kv, D),
        "v_proj.weight": (kv, D),
        "o_proj.weight": (D, q),
        "gate_proj.weight": (F, D),
        "up_proj.weight": (F, D),
        "down_proj.weight": (D, F),
        "norm.weight": (D,),
        "lm_head.weight": (V, D),
    }
    return {
        name: next(shape for suffix, shape in by_suffix.items() if name.endswith(suffix))
        for name in hf_names(cfg).values()
    }


def hf_config(
    cfg: ModelConfig,
    *,
    dtype: torch.dtype,
    eos_id: int | None,
    pad_id: int | None,
) -> dict[str, Any]:
    """The ``config.json`` of ``LlamaForCausalLM`` for the model ``cfg`` describes.

    RoPE is written both ways transformers has spelled it (``rope_theta`` and
    ``rope_scaling`` up to 4.x, ``rope_parameters`` from 5.0), so either reads it; APT has no
    beginning-of-text token.
    """
    theta = cfg.rope_theta
    scaling = _hf_rope_scaling(cfg.rope_scaling)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mlp_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.hidden_size // cfg.num_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
    }


def _hf_rope_scaling(scaling: RopeScalingConfig | None) -> dict[str, Any] | None:
    """``model.rope_scaling`` as transformers' ``rope_scaling`` block (None: plain RoPE)."""
    if scaling is None:
        return None
    fields = {hf: getattr(scaling, apt) for hf, apt in _LLAMA3_KEYS.items()}
    return {"rope_type": scaling.kind, **fields}


def _refuse(source: Path, what: str) -> InteropError:
    return InteropError(f"{source}: {what}; APT cannot import this model. Nothing was loaded.")


def _model_type(hf: dict[str, Any], source: Path) -> str:
    kind = hf.get("model_type")
    if kind in ACCEPTED_MODEL_TYPES:
        return str(kind)
    accepted = ", ".join(ACCEPTED_MODEL_TYPES)
    if kind in _DIFFERENCES:
        why = f"model_type {kind!r} is not Llama's math: {_DIFFERENCES[kind]}"
    elif kind is None:
        why = "has no model_type; it is not a transformers model config"
    else:
        why = f"model_type {kind!r} is not a Llama-shaped model"
    raise _refuse(source, f"{why} (APT imports model_type {accepted})")


def _rope(
    hf: dict[str, Any], source: Path, defaults: dict[str, Any]
) -> tuple[float, dict[str, Any] | None]:
    """The RoPE base of ``hf`` and its scaling as ``model.rope_scaling`` fields (None: plain
    RoPE); refused when the scaling is another kind than llama3, or the rotation partial.

    transformers reads ``rope_scaling`` when it is set (4.x and 5.x alike), else 5.x's
    ``rope_parameters``; so does this.
    """
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    block = hf.get(key)
    theta = hf.get("rope_theta", defaults["rope_theta"])
    scaling = None
    if block is not None:
        # transformers 5 writes {"rope_type": "default", "rope_theta": ...} for plain RoPE.
        plain = "default" if key == "rope_parameters" else None
        kind = block.get("rope_type", block.get("type", plain)) if isinstance(block, dict) else None
        nested = isinstance(block, dict) and any(isinstance(v, dict) for v in block.values())
        if kind not in ("default", "llama3") or nested:
            raise _refuse(
                source,
                f"{key} is set ({block}); APT's RoPE has no frequency scaling but llama3's "
                "(not linear, dynamic, yarn, longrope) and one table for every layer: only the "
                "plain rotary embedding and rope_type llama3 are supported",
            )
        assert isinstance(block, dict)
        theta = block.get("rope_theta", theta)
        if kind == "llama3":
            longest = hf.get("max_position_embeddings", defaults["max_position_embeddings"])
            scaling = _llama3_scaling(
                {"original_max_position_embeddings": longest, **block}, key, source
            )
    params = hf.get("rope_parameters")
    factor = hf.get("partial_rotary_factor", (params or {}).get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise _refuse(
            source, f"partial_rotary_factor is {factor}; APT rotates the whole of every head"
        )
    return float(theta), scaling


def _llama3_scaling(block: dict[str, Any], key: str, source: Path) -> dict[str, Any]:
    """The ``model.rope_scaling`` fields of a ``rope_type: llama3`` block."""
    missing = [name for name in _LLAMA3_KEYS if block.get(name) is None]
    if missing:
        raise _refuse(
            source, f"{key} is llama3 but misses {', '.join(missing)}; transformers needs them too"
        )
    return {"kind": "llama3", **{apt: block[hf_key] for hf_key, apt in _LLAMA3_KEYS.items()}}


def _check_same_math(hf: dict[str, Any], kind: str, source: Path) -> None:
    """Refuse the keys of a Llama / Mistral config that change what the network computes."""
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            part = "q/k/v/o projections" if key == "attention_bias" else "MLP projections"
            raise _refuse(source, f"{key} is true: its {part} have biases, APT's have none")
    act = hf.get("hidden_act", _DEFAULTS[kind]["hidden_act"])
    if act not in _SILU:
        raise _refuse(source, f"hidden_act is {act!r}; APT's SwiGLU MLP gates with silu")
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != width:
        raise _refuse(
            source,
            f"head_dim is {head_dim}, not hidden_size / num_attention_heads = {width}/{heads}; "
            "APT's heads split the width evenly",
        )
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise _refuse(source, f"its weights are quantized ({method}); APT loads float weights")
    window = hf.get("sliding_window", _DEFAULTS[kind].get("sliding_window"))
    longest = hf.get("max_position_embeddings", _DEFAULTS[kind]["max_position_embeddings"])
    if window is not None and window < longest:
        raise _refuse(
            source,
            f"sliding_window is {window}, shorter than max_position_embeddings ({longest}): "
            "its attention forgets tokens further back, APT's attends to all of them",
        )


def apt_config(hf: dict[str, Any], source: Path) -> ModelConfig:
    """The :class:`ModelConfig` of the network a Llama-shaped ``config.json`` describes.

    Args:
        hf: the parsed ``config.json``.
        source: its path, named in errors.

    Raises:
        InteropError: another model_type, or a key that makes the math differ from APT's (RoPE
            scaling other than llama3, biases, another activation, uneven heads, a sliding
            window, quantized weights), or sizes that do not make a model.
    """
    kind = _model_type(hf, source)
    missing = [key for key in _REQUIRED if key not in hf]
    if missing:
        raise _refuse(source, f"misses {', '.join(missing)}; a Llama config gives every size")
    for key in (*_REQUIRED, "num_key_value_heads", "head_dim"):
        value = hf.get(key)
        if (value is not None or key in _REQUIRED) and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise _refuse(source, f"{key} is {value!r}, not a positive integer")
    _check_same_math(hf, kind, source)
    defaults = _DEFAULTS[kind]
    theta, scaling = _rope(hf, source, defaults)
    fields = {
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": hf["num_attention_heads"],
        "num_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "intermediate_size": hf["intermediate_size"],
        "max_seq_len": hf.get("max_position_embeddings", defaults["max_position_embeddings"]),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "norm_eps": hf.get("rms_norm_eps", defaults["rms_norm_eps"]),
        "tie_embeddings": hf.get("tie_word_embeddings", defaults["tie_word_embeddings"]),
        "init_std": hf.get("initializer_range", defaults["initializer_range"]),
    }
    try:
        return ModelConfig.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()
        )
        raise _refuse(source, f"its sizes do not make an APT model ({problems})") from None
