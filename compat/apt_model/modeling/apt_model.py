"""Legacy ``apt_model.modeling.apt_model`` (APT 1.x): now :mod:`apt.model`.

The classes are the 2.0 ones: a decoder-only causal LM built from a ``ModelConfig``
(``APTModel(cfg.model)``) or from keyword sizes (``APTLargeModel(hidden_size=..., ...)``).
"""

from apt.model import APTLargeModel, APTModel
from apt_model._deprecation import warn_moved

warn_moved("apt_model.modeling.apt_model", "apt.model")

__all__ = ["APTLargeModel", "APTModel"]
