"""The version of APT, in one place (``apt.__version__`` re-exports it)."""

__all__ = ["__version__"]

__version__ = "2.0.0a1"
