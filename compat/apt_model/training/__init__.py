"""Legacy ``apt_model.training`` (APT 1.x): see :mod:`apt.trainops.engine`."""
