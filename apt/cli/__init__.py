"""Command-line interface: ``python -m apt`` and ``apt-train``."""
