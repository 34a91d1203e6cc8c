"""Legacy ``apt_model.config`` (APT 1.x): now :mod:`apt.core.config`.

``APTConfig`` is :class:`apt.core.config.APTConfig` itself. :func:`from_yaml` reads a profile
that may still hold the 1.x fields (``plugins``, ``attention_name``/``ffn_name``/
``router_name``, ...), mapped onto the 2.0 config by :func:`translate_legacy` or refused with
what replaces them; ``APTConfig.from_yaml`` reads 2.0 profiles only.
"""

from apt.core.config import APTConfig
from apt_model._deprecation import warn_moved
from apt_model._legacy_config import from_yaml, translate_legacy

warn_moved("apt_model.config", "apt.core.config")

__all__ = ["APTConfig", "from_yaml", "translate_legacy"]
