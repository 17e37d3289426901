"""The engine's HTTP service (API version 1): `create_app` for ASGI servers and tests,
`instruct-edit serve` (engine.server.cli) for people and the Krita plugin.

The names are imported on first use, so light modules (engine.server.instance) can be
imported without loading the web framework and torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.server.app import create_app
    from engine.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from engine.server.app import create_app

        return create_app
    if name == "ServerSettings":
        from engine.server.settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module 'engine.server' has no attribute {name!r}")
