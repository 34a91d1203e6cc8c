"""The error a metric logger raises when its store cannot be used as configured."""

from __future__ import annotations

from apt.core.errors import APTError

__all__ = ["MonitoringError"]


class MonitoringError(APTError):
    """A metric logger cannot use its store: a missing driver, a saved run that the store no
    longer has. The Monitor turns it into one warning and switches that logger off."""
