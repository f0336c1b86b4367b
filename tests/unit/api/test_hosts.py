from __future__ import annotations

import pytest
from tests.unit.api.api_helpers import ADMIN, BASE_URL, Client, api_headers, assert_error

from capsa.store import Store


@pytest.fixture
async def host_uuid(store: Store) -> str:
    host = await store.hosts.register("node-1", "http://127.0.0.1:1", 4000, 8192, ("runc", "crun"))
    return host.uuid


async def test_admins_list_and_show_hosts_by_name_or_uuid(client: Client, host_uuid: str) -> None:
    response = await client.get("/v1/hosts", headers=ADMIN)
    assert response.status == 200
    body = await response.json()
    assert body["next"] is None
    [host] = body["hosts"]
    assert host["uuid"] == host_uuid
    assert host["hostname"] == "node-1"
    assert host["cpus"] == 4.0 and host["mem_total"] == 8192
    assert host["cpu_used"] == 0.0 and host["mem_used"] == 0
    assert host["runtimes"] == ["runc", "crun"]
    assert host["links"][0] == {"href": f"{BASE_URL}/v1/hosts/{host_uuid}", "rel": "self"}
    for ident in ("node-1", host_uuid):
        response = await client.get(f"/v1/hosts/{ident}/", headers=ADMIN)
        assert (await response.json())["uuid"] == host_uuid


async def test_hosts_are_for_admins_only(client: Client, host_uuid: str) -> None:
    response = await client.get("/v1/hosts", headers=api_headers())
    await assert_error(response, 403, "container.policy-not-authorized", "host:get_all")
    response = await client.get(f"/v1/hosts/{host_uuid}", headers=api_headers())
    await assert_error(response, 403, "container.policy-not-authorized", "host:get")


async def test_hosts_need_microversion_1_4(client: Client, host_uuid: str) -> None:
    response = await client.get(
        "/v1/hosts", headers={**ADMIN, "OpenStack-API-Version": "container 1.3"}
    )
    await assert_error(response, 406, "container.microversion-unsupported", "1.4")


async def test_an_unknown_host_is_404(client: Client, host_uuid: str) -> None:
    response = await client.get("/v1/hosts/nowhere", headers=ADMIN)
    await assert_error(response, 404, "container.host-not-found", "nowhere")
