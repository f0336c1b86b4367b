"""The API on a real temporary SQLite store, served by aiohttp's test server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from tests.unit.api.api_helpers import Client, agent, config_for

from capsa.api.app import create_app
from capsa.store import Store

# The stub agent fixture, shared with the CLI tests.
__all__ = ["agent"]


@pytest.fixture
async def make_client(
    store: Store, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    """Starts the API; keyword arguments set [api] settings, ``routes`` adds extra handlers."""
    clients: list[Client] = []

    async def start(routes: list[web.RouteDef] | None = None, **api: Any) -> Client:
        app = create_app(config_for(tmp_path, agent_timeout=2.0, **api), store)
        app.router.add_routes(routes or [])
        client: Client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


@pytest.fixture
async def client(make_client: Callable[..., Awaitable[Client]]) -> Client:
    return await make_client()
