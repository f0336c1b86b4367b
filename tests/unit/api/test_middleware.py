from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from tests.unit.api.api_helpers import Client, api_headers, assert_error


@pytest.mark.parametrize("path", ["/nothing", "/v1/nothing", "/v1/capsules/x/y/z"])
async def test_unknown_paths_are_404_in_zun_body(client: Client, path: str) -> None:
    response = await client.get(path, headers=api_headers())
    await assert_error(response, 404, "container.not-found", path)


async def test_a_wrong_method_is_405_naming_the_allowed_ones(client: Client) -> None:
    response = await client.put("/v1/capsules", headers=api_headers())
    detail = await assert_error(response, 405, "container.method-not-allowed", "PUT")
    assert "GET" in detail and "POST" in detail
    assert set(response.headers["Allow"].split(", ")) == {"GET", "POST"}
    assert response.headers["OpenStack-API-Version"] == "container 1.40"


async def test_an_unexpected_exception_is_500_logged_with_the_request_id_and_not_leaked(
    make_client: Callable[..., Awaitable[Client]], caplog: pytest.LogCaptureFixture
) -> None:
    async def explode(request: web.Request) -> web.Response:
        raise RuntimeError("secret database password in a traceback")

    client = await make_client(routes=[web.get("/v1/explode", explode)])
    with caplog.at_level(logging.ERROR):
        response = await client.get("/v1/explode", headers=api_headers())
    detail = await assert_error(response, 500, "container.internal-server-error")
    request_id = response.headers["x-openstack-request-id"]
    assert request_id in detail
    assert "secret" not in await response.text()
    [record] = [r for r in caplog.records if "request failed" in r.getMessage()]
    assert record.capsa_fields["request_id"] == request_id  # type: ignore[attr-defined]
    assert record.exc_info is not None


async def test_every_response_carries_a_distinct_request_id(client: Client) -> None:
    first = await client.get("/v1/capsules", headers=api_headers())
    second = await client.get("/v1/capsules", headers=api_headers())
    assert first.headers["x-openstack-request-id"] != second.headers["x-openstack-request-id"]


async def test_an_oversized_body_is_400_naming_the_limit(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(max_body_bytes=2048)
    body = b'{"template": "' + b"x" * 4096 + b'"}'
    response = await client.post(
        "/v1/capsules",
        data=body,
        headers={**api_headers(), "Content-Type": "application/json"},
    )
    await assert_error(response, 400, "container.request-body-too-large", "2048 bytes")
    listing = await client.get("/v1/capsules", headers=api_headers())
    assert (await listing.json())["capsules"] == []


async def test_an_oversized_chunked_body_is_400_too(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(max_body_bytes=2048)

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(8):
            yield b"x" * 1024

    response = await client.post("/v1/capsules", data=chunks(), headers=api_headers())
    await assert_error(response, 400, "container.request-body-too-large", "2048 bytes")


async def test_a_body_that_is_not_json_is_400(client: Client) -> None:
    response = await client.post("/v1/capsules", data=b"{not json", headers=api_headers())
    await assert_error(response, 400, "container.invalid", "not valid JSON")
