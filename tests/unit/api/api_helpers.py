"""What the API tests share: headers, templates, a Zun error body check."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from capsa.config import ApiConfig, AuthConfig, CapsuleConfig, Config

BASE_URL = "http://capsa.test:9517"

Client = TestClient[web.Request, web.Application]


def api_headers(
    version: str | None = "1.40", project: str | None = None, roles: str | None = None
) -> dict[str, str]:
    headers = {"X-Auth-Token": "notused"}
    if version is not None:
        headers["OpenStack-API-Version"] = f"container {version}"
    if project is not None:
        headers["X-Project-Id"] = project
    if roles is not None:
        headers["X-Roles"] = roles
    return headers


ADMIN = api_headers(roles="member,admin")


def zun_template(name: str | None = "web", **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"labels": {"app": "web"}}
    if name is not None:
        metadata["name"] = name
    return {
        "kind": "capsule",
        "capsuleVersion": "beta",
        "metadata": metadata,
        "spec": {"containers": [{"image": "busybox", "command": ["sleep", "1000"]}], **spec},
    }


def config_for(tmp_path: Path, auth: AuthConfig | None = None, **api: Any) -> Config:
    """Settings of a test API; by default in noauth mode, where the X-Project-Id and X-Roles
    headers of :func:`api_headers` say who calls (tests/unit/api/test_identity.py covers tokens)."""
    return Config(
        state_dir=tmp_path,
        api=ApiConfig(public_url=BASE_URL, **api),
        auth=auth or AuthConfig(mode="noauth"),
        capsule=CapsuleConfig(default_cpu=0.25, default_memory_mb=96, max_containers=4),
    )


async def create(
    client: Client, template: Any, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    response = await client.post(
        "/v1/capsules", json={"template": template}, headers=headers or api_headers()
    )
    assert response.status == 202, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def shown(client: Client, path: str, headers: dict[str, str]) -> dict[str, Any]:
    """The body of a GET of ``path`` that must answer 200."""
    response = await client.get(path, headers=headers)
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def assert_error(response: Any, status: int, code: str, *fragments: str) -> str:
    """Checks Zun's error body and returns its detail."""
    assert response.status == status, await response.text()
    body = await response.json()
    assert response.headers["Content-Type"].startswith("application/json")
    [error] = body["errors"]
    assert set(error) >= {"request_id", "code", "status", "title", "detail", "links"}
    assert error["request_id"] == response.headers["x-openstack-request-id"]
    assert error["request_id"].startswith("req-")
    assert error["status"] == status
    assert error["code"] == code
    assert error["links"] == []
    for fragment in fragments:
        assert fragment in error["detail"], error["detail"]
    detail: str = error["detail"]
    return detail


class StubAgent:
    """Answers GET /v1/agent/containers/{uuid}/logs; ``status`` and ``lines`` set its answer."""

    def __init__(self) -> None:
        self.queries: list[dict[str, str]] = []
        self.status = 200
        self.lines = ["line 1\n", "line 2\n"]
        # A follow stream sends its first line, then the rest once this is set.
        self.release = asyncio.Event()
        self.server = TestServer(self._app())

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/agent/containers/{uuid}/logs", self._logs)
        return app

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        self.queries.append({"uuid": request.match_info["uuid"], **request.query})
        if self.status != 200:
            return web.Response(status=self.status, text="no such container here")
        if request.query.get("follow") != "true":
            return web.Response(text="".join(self.lines))
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        first, *rest = self.lines
        await response.write(first.encode())
        await self.release.wait()
        for line in rest:
            await response.write(line.encode())
        await response.write_eof()
        return response

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def agent() -> AsyncIterator[StubAgent]:
    """A running stub agent, stopped after the test."""
    stub = StubAgent()
    await stub.server.start_server()
    try:
        yield stub
    finally:
        await stub.server.close()
