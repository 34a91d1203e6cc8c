"""Legacy ``apt_model.training.trainer``: now :mod:`apt.trainops.engine`."""

from apt.trainops.engine import Finetuner, Trainer
from apt_model._deprecation import warn_moved

warn_moved("apt_model.training.trainer", "apt.trainops.engine")

__all__ = ["Finetuner", "Trainer"]
