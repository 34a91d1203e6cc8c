"""``apt.model``: what the network is.

    from apt.core.config import ModelConfig
    from apt.model import build_model, from_hf, to_hf

    model = build_model(ModelConfig(preset="tiny"))
    out = model(input_ids, targets)      # ModelOutput: logits, loss, lm_loss, aux_losses, stats
    to_hf(model, "exported/")            # a folder transformers loads as LlamaForCausalLM
    apply_lora(model, targets=["q_proj", "v_proj"], rank=8, alpha=16)   # LoRA adapters
    model = from_hf("exported/")         # and back (any local Llama-shaped checkpoint)

This package imports only ``apt.core`` (never ``apt.trainops``).
"""

from apt.model.architectures import APTLargeModel, APTModel, ModelOutput, build_model
from apt.model.interop import from_hf, to_hf
from apt.model.layers.lora import LoRALinear, apply_lora, load_adapter, merge_lora, save_adapter
from apt.model.layers.switch import Controllable, ModuleGroup
from apt.model.store import ModelStore

__all__ = [
    "APTLargeModel",
    "APTModel",
    "Controllable",
    "LoRALinear",
    "ModelOutput",
    "ModelStore",
    "ModuleGroup",
    "apply_lora",
    "build_model",
    "from_hf",
    "load_adapter",
    "merge_lora",
    "save_adapter",
    "to_hf",
]
