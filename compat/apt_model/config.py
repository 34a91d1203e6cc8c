"""Legacy ``apt_model.config`` (APT 1.x): now :mod:`apt.core.config`.

``APTConfig`` is :class:`apt.core.config.APTConfig` itself, and ``from_yaml`` is
``APTConfig.from_yaml``: it reads a profile that may still hold the 1.x fields (``plugins``,
``attention_name``/``ffn_name``/``router_name``, ...), mapped onto the 2.0 config by
:func:`~apt.core.config.legacy.translate_legacy` or refused with what replaces them.
"""

from apt.core.config import APTConfig
from apt.core.config.legacy import translate_legacy
from apt_model._deprecation import warn_moved

warn_moved("apt_model.config", "apt.core.config")

from_yaml = APTConfig.from_yaml

__all__ = ["APTConfig", "from_yaml", "translate_legacy"]
