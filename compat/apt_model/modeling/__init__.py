"""Legacy ``apt_model.modeling`` (APT 1.x): see :mod:`apt.model`."""
