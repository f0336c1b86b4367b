"""The API in local identity mode, with users made directly through the identity service."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import argon2
import pytest
from aiohttp.test_utils import TestClient, TestServer
from tests.unit.api.api_helpers import Client, config_for

from capsa.api.app import create_app
from capsa.api.keys import IDENTITY
from capsa.config import AuthConfig, PolicyConfig
from capsa.identity import passwords
from capsa.identity.admin import IdentityAdmin
from capsa.identity.service import IdentityService
from capsa.model.identity import Project, User
from capsa.store import Store

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def cheap_password_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """argon2id with tiny costs: the same code path, milliseconds instead of a second per test."""
    monkeypatch.setattr(
        passwords, "HASHER", argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    )


@dataclass
class Cloud:
    """A test API with local identity, and ways to add projects, users and tokens to it."""

    client: Client
    identity: IdentityService
    identity_key_path: Path

    async def project(self, name: str) -> Project:
        found = await self.identity.store.find_project(name)
        return found or await self.identity.store.create_project(name)

    async def user(self, name: str, project: str, role: str = "member") -> User:
        admin = IdentityAdmin(self.identity.store)
        return await admin.create_user(name, PASSWORD, await self.project(project), role)

    async def login(
        self, user: str, project: str | None = None, password: str = PASSWORD
    ) -> tuple[int, Any, str | None]:
        """POST /v3/auth/tokens with the password method: status, body, X-Subject-Token."""
        auth: dict[str, Any] = {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {"name": user, "domain": {"name": "Default"}, "password": password}
                },
            }
        }
        if project is not None:
            auth["scope"] = {"project": {"name": project, "domain": {"id": "default"}}}
        response = await self.client.post("/v3/auth/tokens", json={"auth": auth})
        return response.status, await response.json(), response.headers.get("X-Subject-Token")

    async def token(self, user: str, project: str, role: str = "member") -> str:
        """A token of a new user with ``role`` in ``project``."""
        await self.user(user, project, role)
        status, body, token = await self.login(user, project)
        assert status == 201 and token, body
        return token


def token_headers(token: str, version: str = "1.40") -> dict[str, str]:
    return {"X-Auth-Token": token, "OpenStack-API-Version": f"container {version}"}


CloudFactory = Callable[..., Awaitable[Cloud]]


@pytest.fixture
async def make_cloud(store: Store, tmp_path: Path) -> AsyncIterator[CloudFactory]:
    """Starts the API in local identity mode; ``policy`` changes it."""
    clients: list[Client] = []

    async def start(policy: PolicyConfig | None = None, **auth: Any) -> Cloud:
        cfg = config_for(tmp_path, auth=AuthConfig(mode="local", **auth))
        if policy is not None:
            cfg = dataclasses.replace(cfg, policy=policy)
        app = create_app(cfg, store)
        client: Client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return Cloud(client, app[IDENTITY], cfg.token_key_path)

    yield start
    for client in clients:
        await client.close()


@pytest.fixture
async def cloud(make_cloud: CloudFactory) -> Cloud:
    return await make_cloud()
