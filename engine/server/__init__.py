"""The engine's HTTP service (API version 1): `create_app` for ASGI servers and tests,
`instruct-edit serve` (engine.server.cli) for people and the Krita plugin."""

from engine.server.app import create_app
from engine.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
