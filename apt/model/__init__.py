"""``apt.model``: what the network is.

    from apt.core.config import ModelConfig
    from apt.model import build_model

    model = build_model(ModelConfig(preset="tiny"))
    out = model(input_ids, targets)      # ModelOutput: logits, loss, lm_loss, aux_losses, stats

This package imports only ``apt.core`` (never ``apt.trainops``).
"""

from apt.model.architectures import APTLargeModel, APTModel, ModelOutput, build_model
from apt.model.layers.switch import Controllable, ModuleGroup

__all__ = ["APTLargeModel", "APTModel", "Controllable", "ModelOutput", "ModuleGroup", "build_model"]
