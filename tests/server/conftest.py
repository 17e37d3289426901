"""Fixtures for the HTTP service tests (helpers live in service_helpers.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

# The tests import service_helpers by name (pytest runs with --import-mode=importlib).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_helpers import FakeFactory, make_settings

from engine.server import create_app


@pytest.fixture
def client_factory() -> Iterator[Callable[..., TestClient]]:
    """`client_factory(factory=FakeFactory(), **settings)` -> a started TestClient (closed after)."""
    clients: list[TestClient] = []

    def make(factory: Callable | None = None, **overrides: Any) -> TestClient:
        app = create_app(make_settings(**overrides), editor_factory=factory or FakeFactory())
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
