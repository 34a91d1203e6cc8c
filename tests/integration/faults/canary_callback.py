"""A callback with secret-looking options, for the canary tests: it only keeps them."""

from __future__ import annotations

from apt.trainops.engine import Callback

__all__ = ["Canary"]


class Canary(Callback):
    """Holds an ``api_token`` and an ``endpoint`` URI with credentials, as a user's callback
    for an external service would; neither may ever be written or logged by APT."""

    def __init__(self, api_token: str, endpoint: str) -> None:
        self.api_token = api_token
        self.endpoint = endpoint
