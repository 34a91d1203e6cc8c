"""Model architectures: :class:`APTModel` (decoder-only LM) and :class:`APTLargeModel`."""

from apt.model.architectures.apt_model import APTModel, Block, build_model
from apt.model.architectures.large import APTLargeModel
from apt.model.architectures.output import ModelOutput

__all__ = ["APTLargeModel", "APTModel", "Block", "ModelOutput", "build_model"]
