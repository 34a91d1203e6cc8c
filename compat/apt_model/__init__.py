"""Legacy import paths of APT 1.x (``apt_model``), kept working on top of APT 2.0.

Each legacy module re-exports its APT 2.0 replacement (or a thin adapter keeping the 1.x
signature) and warns once with a DeprecationWarning that names the new import path:
``apt_model.config``, ``apt_model.modeling.apt_model``, ``apt_model.training.callbacks`` and
``apt_model.training.trainer``. The packages themselves hold nothing and do not warn.
docs/migration.md maps every 1.x name to its replacement.
"""
