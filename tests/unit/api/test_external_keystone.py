"""auth.mode = "keystone": capsa checks tokens against an external Keystone. The Keystone here is
capsa's own identity service, served by another app on another port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from tests.unit.api.api_helpers import Client, assert_error, config_for, zun_template
from tests.unit.api.identity_helpers import (
    PASSWORD,
    Cloud,
    cheap_password_hashes,
    cloud,
    make_cloud,
    token_headers,
)

from capsa.api.app import create_app
from capsa.config import AuthConfig
from capsa.store import Store

__all__ = ["cheap_password_hashes", "cloud", "make_cloud"]

CapsaFactory = Callable[..., Awaitable[Client]]


@pytest.fixture
async def keystone(cloud: Cloud) -> Cloud:
    """The "external Keystone", with capsa's service user (admin in project service)."""
    await cloud.user("capsa-service", "service", role="admin")
    return cloud


@pytest.fixture
async def capsa_on(tmp_path: Path) -> AsyncIterator[CapsaFactory]:
    """Starts capsa APIs in keystone mode, each on its own store, pointed at a Keystone URL."""
    started: list[tuple[Client, Store]] = []

    async def start(keystone_url: str, **auth: Any) -> Client:
        settings: dict[str, Any] = {
            "mode": "keystone",
            "keystone_url": keystone_url,
            "service_user": "capsa-service",
            "service_password": PASSWORD,
            **auth,
        }
        state_dir = tmp_path / f"capsa-{len(started)}"
        state_dir.mkdir()
        cfg = config_for(state_dir, auth=AuthConfig(**settings))
        store = Store(cfg.database_url)
        await store.open()
        client: Client = TestClient(TestServer(create_app(cfg, store)))
        await client.start_server()
        started.append((client, store))
        return client

    yield start
    for client, store in started:
        await client.close()
        await store.close()


def keystone_url(keystone: Cloud) -> str:
    return str(keystone.client.make_url("/v3"))


async def test_tokens_of_the_external_keystone_work_and_name_its_project(
    keystone: Cloud, capsa_on: CapsaFactory
) -> None:
    capsa = await capsa_on(keystone_url(keystone))
    token = await keystone.token("alice", "team-a")
    project = await keystone.identity.store.find_project("team-a")
    assert project is not None
    response = await capsa.post(
        "/v1/capsules", json={"template": zun_template()}, headers=token_headers(token)
    )
    assert response.status == 202, await response.text()
    assert (await response.json())["project_id"] == project.id
    response = await capsa.get("/v1/capsules", headers=token_headers(token))
    assert [c["name"] for c in (await response.json())["capsules"]] == ["web"]
    response = await capsa.get("/v1/capsules", headers=token_headers("capsa1.forged.token"))
    await assert_error(response, 401, "container.not-authenticated")
    assert response.headers["WWW-Authenticate"] == f'Keystone uri="{keystone_url(keystone)}"'
    # capsa's own /v3 is off in this mode: clients go to the Keystone.
    response = await capsa.post("/v3/auth/tokens", json={})
    assert response.status == 404
    assert "identity service is off" in (await response.json())["error"]["message"]


async def test_answers_are_cached_briefly_and_only_as_configured(
    keystone: Cloud, capsa_on: CapsaFactory
) -> None:
    uncached = await capsa_on(keystone_url(keystone), cache_seconds=0)
    cached = await capsa_on(keystone_url(keystone), cache_seconds=3600)
    token = await keystone.token("bob", "team-b")
    for capsa in (uncached, cached):
        assert (await capsa.get("/v1/capsules", headers=token_headers(token))).status == 200
    user = await keystone.identity.store.find_user("bob")
    assert user is not None
    await keystone.identity.store.update_user(user.id, enabled=False)
    response = await uncached.get("/v1/capsules", headers=token_headers(token))
    await assert_error(response, 401, "container.not-authenticated")
    # Within its cache time, the other capsa still believes Keystone's earlier answer.
    assert (await cached.get("/v1/capsules", headers=token_headers(token))).status == 200


async def test_an_unreachable_keystone_or_wrong_service_credentials_answer_503(
    keystone: Cloud, capsa_on: CapsaFactory
) -> None:
    token = await keystone.token("carol", "team-c")
    capsa = await capsa_on(keystone_url(keystone), service_password="not the password")
    response = await capsa.get("/v1/capsules", headers=token_headers(token))
    await assert_error(response, 503, "container.identity-unavailable", "auth.service_user")
    capsa = await capsa_on("http://127.0.0.1:9/v3")
    response = await capsa.get("/v1/capsules", headers=token_headers(token))
    await assert_error(response, 503, "container.identity-unavailable", "127.0.0.1:9")
