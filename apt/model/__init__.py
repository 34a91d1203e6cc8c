"""``apt.model``: what the network is.

    from apt.core.config import ModelConfig
    from apt.model import build_model, from_hf, to_hf

    model = build_model(ModelConfig(preset="tiny"))
    out = model(input_ids, targets)      # ModelOutput: logits, loss, lm_loss, aux_losses, stats
    to_hf(model, "exported/")            # a folder transformers loads as LlamaForCausalLM
    model = from_hf("exported/")         # and back (any local Llama-shaped checkpoint)

This package imports only ``apt.core`` (never ``apt.trainops``).
"""

from apt.model.architectures import APTLargeModel, APTModel, ModelOutput, build_model
from apt.model.interop import from_hf, to_hf
from apt.model.layers.switch import Controllable, ModuleGroup

__all__ = [
    "APTLargeModel",
    "APTModel",
    "Controllable",
    "ModelOutput",
    "ModuleGroup",
    "build_model",
    "from_hf",
    "to_hf",
]
