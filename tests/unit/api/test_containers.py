"""The logs proxy, against a stub agent that serves the agent's logs contract."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from tests.unit.api.api_helpers import (
    ADMIN,
    Client,
    StubAgent,
    api_headers,
    assert_error,
    create,
    zun_template,
)

from capsa.store import Store


async def placed_capsule(client: Client, store: Store, agent_url: str) -> dict[str, Any]:
    created = await create(client, zun_template())
    await store.hosts.register("h1", agent_url, 4000, 4096, ("runc",))
    assert await store.hosts.claim(created["uuid"], "h1", 250, 96)
    return created


async def test_logs_are_read_from_the_agent_and_answered_as_a_json_string(
    client: Client, store: Store, agent: StubAgent
) -> None:
    created = await placed_capsule(client, store, agent.url)
    container = created["containers"][0]["uuid"]
    response = await client.get(
        f"/v1/containers/{container}/logs?stdout=True&stderr=false&timestamps=1&tail=10",
        headers=api_headers(),
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert await response.json() == "line 1\nline 2\n"
    assert agent.queries == [
        {
            "uuid": container,
            "stdout": "true",
            "stderr": "false",
            "timestamps": "true",
            "tail": "10",
            "follow": "false",
        }
    ]


async def test_defaults_and_since_forms_reach_the_agent(
    client: Client, store: Store, agent: StubAgent
) -> None:
    created = await placed_capsule(client, store, agent.url)
    container = created["containers"][0]["uuid"]
    for since in ("1700000000", "2023-11-14 22:13:20", "2023-11-14 22:13:20,5"):
        response = await client.get(
            f"/v1/containers/{container}/logs/", params={"since": since}, headers=api_headers()
        )
        assert response.status == 200
    assert [q["since"] for q in agent.queries] == ["1700000000", "1700000000", "1700000000.500"]
    assert {(q["stdout"], q["stderr"], q["timestamps"], q["tail"]) for q in agent.queries} == {
        ("true", "true", "false", "all")
    }


async def test_follow_streams_text_as_the_agent_sends_it(
    client: Client, store: Store, agent: StubAgent
) -> None:
    created = await placed_capsule(client, store, agent.url)
    container = created["containers"][0]["uuid"]
    agent.lines = [f"tick {i}\n" for i in range(4)]
    response = await client.get(
        f"/v1/containers/{container}/logs?follow=true", headers=api_headers()
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    assert response.headers["x-openstack-request-id"].startswith("req-")
    assert response.headers["OpenStack-API-Version"] == "container 1.40"
    # The first line arrives while the agent still holds the others: nothing is buffered.
    first = await asyncio.wait_for(response.content.readline(), timeout=5)
    assert first == b"tick 0\n"
    agent.release.set()
    rest = await asyncio.wait_for(response.content.read(), timeout=5)
    assert rest == b"tick 1\ntick 2\ntick 3\n"
    assert agent.queries[0]["follow"] == "true"


@pytest.mark.parametrize(
    "query",
    [
        "stdout=maybe",
        "timestamps=2",
        "tail=-1",
        "tail=last",
        "since=yesterday",
        "since=2023-13-45 99:00:00",
        "stdout=false&stderr=false",
        "color=true",
    ],
)
async def test_bad_log_parameters_are_400(
    client: Client, store: Store, agent: StubAgent, query: str
) -> None:
    created = await placed_capsule(client, store, agent.url)
    container = created["containers"][0]["uuid"]
    response = await client.get(f"/v1/containers/{container}/logs?{query}", headers=api_headers())
    await assert_error(response, 400, "container.invalid-value")
    assert agent.queries == []


async def test_containers_of_other_projects_and_unknown_ones_are_404(
    client: Client, store: Store, agent: StubAgent
) -> None:
    created = await placed_capsule(client, store, agent.url)
    container = created["containers"][0]["uuid"]
    response = await client.get(
        f"/v1/containers/{container}/logs", headers=api_headers(project="other")
    )
    await assert_error(response, 404, "container.container-not-found", container)
    response = await client.get("/v1/containers/nope/logs", headers=api_headers())
    await assert_error(response, 404, "container.container-not-found")
    response = await client.get(f"/v1/containers/{container}/logs", headers=ADMIN)
    assert response.status == 200


async def test_a_capsule_without_host_is_409(client: Client, store: Store) -> None:
    created = await create(client, zun_template())
    container = created["containers"][0]["uuid"]
    response = await client.get(f"/v1/containers/{container}/logs", headers=api_headers())
    await assert_error(response, 409, "container.invalid-state", "not on a host yet")


async def test_an_unreachable_agent_is_503_naming_the_host_to_admins_only(
    client: Client, store: Store
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    created = await placed_capsule(client, store, f"http://127.0.0.1:{closed_port}")
    container = created["containers"][0]["uuid"]
    response = await client.get(f"/v1/containers/{container}/logs", headers=ADMIN)
    await assert_error(
        response, 503, "container.container-host-not-up", "h1", f"127.0.0.1:{closed_port}"
    )
    response = await client.get(f"/v1/containers/{container}/logs", headers=api_headers())
    detail = await assert_error(
        response, 503, "container.container-host-not-up", "the container's host", "failed"
    )
    assert "h1" not in detail and str(closed_port) not in detail


@pytest.mark.parametrize(
    ("agent_status", "status", "code"),
    [(404, 409, "container.invalid-state"), (500, 502, "container.compute-agent-error")],
)
async def test_agent_refusals_are_explained(
    client: Client, store: Store, agent: StubAgent, agent_status: int, status: int, code: str
) -> None:
    created = await placed_capsule(client, store, agent.url)
    container = created["containers"][0]["uuid"]
    agent.status = agent_status
    response = await client.get(f"/v1/containers/{container}/logs", headers=ADMIN)
    await assert_error(response, status, code, "host h1", "no such container here")
    response = await client.get(f"/v1/containers/{container}/logs", headers=api_headers())
    detail = await assert_error(response, status, code, "no such container here")
    assert "h1" not in detail


async def test_a_follower_that_goes_away_ends_the_stream_quietly(
    client: Client, store: Store, agent: StubAgent, caplog: pytest.LogCaptureFixture
) -> None:
    created = await placed_capsule(client, store, agent.url)
    container = created["containers"][0]["uuid"]
    agent.lines = ["first\n", "second\n"]
    response = await client.get(
        f"/v1/containers/{container}/logs?follow=yes", headers=api_headers()
    )
    assert await asyncio.wait_for(response.content.readline(), timeout=5) == b"first\n"
    response.close()
    agent.release.set()
    await asyncio.sleep(0.2)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    # The API keeps serving.
    response = await client.get(f"/v1/containers/{container}/logs", headers=api_headers())
    assert response.status == 200


async def test_the_container_list_has_zuns_shape_and_leaves_capsule_containers_out(
    client: Client,
) -> None:
    await create(client, zun_template("listed"))
    response = await client.get("/v1/containers", headers=api_headers())
    assert response.status == 200
    assert await response.json() == {"containers": [], "next": None}
    response = await client.get("/v1/containers/?all_projects=true", headers=ADMIN)
    assert response.status == 200
    response = await client.get("/v1/containers?all_projects=true", headers=api_headers())
    await assert_error(response, 403, "container.policy-not-authorized", "all_projects")
    response = await client.get("/v1/containers?limit=0", headers=api_headers())
    await assert_error(response, 400, "container.invalid-value", "limit")
    reader = api_headers(roles="reader")
    assert (await client.get("/v1/containers", headers=reader)).status == 200
