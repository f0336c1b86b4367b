"""``/v1/quotas`` and ``/v1/quota_classes`` as Zun's clients call them, and the 403 at create."""

from __future__ import annotations

import asyncio

import pytest
from tests.unit.api.api_helpers import ADMIN, Client, api_headers, assert_error, zun_template

from capsa.store import Store

# The configured defaults of the tests' API (capsa's, which are Zun's).
DEFAULTS = {"containers": 40, "cpu": 20, "memory": 51200, "disk": 100}
MEMBER = api_headers(project="p1")


async def test_a_project_reads_its_quotas_and_defaults(client: Client) -> None:
    response = await client.get("/v1/quotas/p1", headers=MEMBER)
    assert response.status == 200
    assert await response.json() == DEFAULTS
    response = await client.get("/v1/quotas/p1/defaults", headers=MEMBER)
    assert await response.json() == DEFAULTS


async def test_usages_show_limit_and_use_in_zuns_units(client: Client) -> None:
    template = zun_template()
    template["spec"]["containers"][0]["resources"] = {"requests": {"cpu": 0.5, "memory": 300}}
    response = await client.post("/v1/capsules", json={"template": template}, headers=MEMBER)
    assert response.status == 202
    response = await client.get("/v1/quotas/p1?usages=True", headers=MEMBER)
    assert await response.json() == {
        "containers": {"limit": 40, "in_use": 1},
        "cpu": {"limit": 20, "in_use": 0.5},
        "memory": {"limit": 51200, "in_use": 300},
        "disk": {"limit": 100, "in_use": 0},
    }


async def test_admins_update_and_reset_a_projects_quotas(client: Client) -> None:
    response = await client.put(
        "/v1/quotas/p1", json={"containers": "5", "memory": 1024, "cpu": -1}, headers=ADMIN
    )
    assert response.status == 200
    assert await response.json() == {**DEFAULTS, "containers": 5, "memory": 1024, "cpu": -1}
    response = await client.get("/v1/quotas/p1", headers=MEMBER)
    assert (await response.json())["containers"] == 5
    response = await client.get("/v1/quotas/p2", headers=api_headers(project="p2"))
    assert await response.json() == DEFAULTS
    response = await client.delete("/v1/quotas/p1", headers=ADMIN)
    assert response.status == 200
    response = await client.get("/v1/quotas/p1", headers=MEMBER)
    assert await response.json() == DEFAULTS


async def test_the_default_class_changes_every_projects_defaults(client: Client) -> None:
    response = await client.put(
        "/v1/quota_classes/default", json={"containers": 7, "disk": 0}, headers=ADMIN
    )
    assert response.status == 200
    expected = {**DEFAULTS, "containers": 7, "disk": 0}
    assert await response.json() == expected
    for path in ("/v1/quota_classes/default", "/v1/quotas/p1", "/v1/quotas/p1/defaults/"):
        response = await client.get(path, headers={**ADMIN, "X-Project-Id": "p1"})
        assert await response.json() == expected, path


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v1/quotas/p1"),
        ("DELETE", "/v1/quotas/p1"),
        ("GET", "/v1/quotas/p2"),
        ("GET", "/v1/quotas/p2/defaults"),
        ("GET", "/v1/quota_classes/default"),
        ("PUT", "/v1/quota_classes/default"),
    ],
)
async def test_what_is_for_admins_is_refused_to_members(
    client: Client, method: str, path: str
) -> None:
    response = await client.request(method, path, json={"containers": 1}, headers=MEMBER)
    await assert_error(response, 403, "container.policy-not-authorized", "Policy doesn't allow")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"pods": 3}, "Unknown quota resource(s): pods"),
        ({"cpu": -2}, "Invalid quota for cpu: -2"),
        ({"cpu": "1.5"}, "Invalid quota for cpu: '1.5'"),
        ({"memory": True}, "Invalid quota for memory: True"),
        ([1], "must be an object"),
    ],
)
async def test_bad_updates_are_400_and_change_nothing(
    client: Client, body: object, fragment: str
) -> None:
    response = await client.put("/v1/quotas/p1", json=body, headers=ADMIN)
    await assert_error(response, 400, "container.invalid", fragment)
    response = await client.get("/v1/quotas/p1", headers=ADMIN)
    assert await response.json() == DEFAULTS


async def test_twenty_concurrent_creates_against_five_give_five_capsules_and_fifteen_403s(
    client: Client, store: Store
) -> None:
    response = await client.put("/v1/quotas/p1", json={"containers": 5}, headers=ADMIN)
    assert response.status == 200

    async def create(i: int) -> tuple[int, dict[str, object]]:
        response = await client.post(
            "/v1/capsules", json={"template": zun_template(f"c{i}")}, headers=MEMBER
        )
        return response.status, await response.json()

    results = await asyncio.gather(*(create(i) for i in range(20)))
    assert sorted(status for status, _ in results).count(202) == 5
    refusals = [body for status, body in results if status != 202]
    assert len(refusals) == 15
    for body in refusals:
        [error] = body["errors"]
        assert error["status"] == 403
        assert error["code"] == "container.over-quota"
        assert error["detail"].startswith("Quota exceeded for resources: containers (project p1")
        assert "limit 5, in use 5" in error["detail"]
    assert await store.capsules.count("p1") == 5

    # Usage comes back once a capsule's records are gone.
    first = next(body for status, body in results if status == 202)
    response = await client.delete(f"/v1/capsules/{first['uuid']}", headers=MEMBER)
    assert response.status == 204
    response = await client.post(
        "/v1/capsules", json={"template": zun_template("again")}, headers=MEMBER
    )
    assert response.status == 202
