"""Legacy import paths of APT 1.x (``apt_model``), kept working on top of APT 2.0.

Each legacy module re-exports its APT 2.0 replacement and warns once with a DeprecationWarning
that names the new import path.
"""
