"""Policy with real tokens: projects see only their own, readers change nothing, admins reach all,
and an operator's rules replace the defaults."""

from __future__ import annotations

from typing import Any

from tests.unit.api.api_helpers import assert_error, zun_template
from tests.unit.api.identity_helpers import (
    Cloud,
    CloudFactory,
    cheap_password_hashes,
    cloud,
    make_cloud,
    token_headers,
)

from capsa.config import PolicyConfig

__all__ = ["cheap_password_hashes", "cloud", "make_cloud"]


async def create(cloud: Cloud, token: str, template: dict[str, Any]) -> dict[str, Any]:
    response = await cloud.client.post(
        "/v1/capsules", json={"template": template}, headers=token_headers(token)
    )
    assert response.status == 202, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def names(cloud: Cloud, token: str, query: str = "") -> set[str]:
    response = await cloud.client.get(f"/v1/capsules{query}", headers=token_headers(token))
    assert response.status == 200, await response.text()
    return {c["name"] for c in (await response.json())["capsules"]}


async def test_another_projects_capsule_is_404_and_never_listed(cloud: Cloud) -> None:
    alice = await cloud.token("alice", "team-a")
    bob = await cloud.token("bob", "team-b")
    mine = await create(cloud, alice, zun_template("alpha"))
    await create(cloud, bob, zun_template("beta"))
    assert await names(cloud, alice) == {"alpha"}
    assert await names(cloud, bob) == {"beta"}
    for ident in (mine["uuid"], "alpha"):
        response = await cloud.client.get(f"/v1/capsules/{ident}", headers=token_headers(bob))
        await assert_error(response, 404, "container.capsule-not-found")
        response = await cloud.client.delete(f"/v1/capsules/{ident}", headers=token_headers(bob))
        await assert_error(response, 404, "container.capsule-not-found")
    response = await cloud.client.get(
        f"/v1/containers/{mine['containers'][0]['uuid']}/logs", headers=token_headers(bob)
    )
    await assert_error(response, 404, "container.container-not-found")
    # Still there for its owner.
    response = await cloud.client.get(f"/v1/capsules/{mine['uuid']}", headers=token_headers(alice))
    assert response.status == 200
    # all_projects is for admins only.
    response = await cloud.client.get("/v1/capsules?all_projects=true", headers=token_headers(bob))
    await assert_error(response, 403, "container.policy-not-authorized", "all_projects", "admin")


async def test_admins_reach_every_project_and_see_hosts(cloud: Cloud) -> None:
    alice = await cloud.token("alice", "team-a")
    admin = await cloud.token("root", "admins", role="admin")
    mine = await create(cloud, alice, zun_template("alpha"))
    assert "host" not in mine
    assert await names(cloud, admin) == set()
    assert await names(cloud, admin, "?all_projects=true") == {"alpha"}
    response = await cloud.client.get(f"/v1/capsules/{mine['uuid']}", headers=token_headers(admin))
    assert response.status == 200
    assert "host" in await response.json()
    response = await cloud.client.get("/v1/hosts", headers=token_headers(admin))
    assert response.status == 200
    response = await cloud.client.get("/v1/hosts", headers=token_headers(alice))
    await assert_error(response, 403, "container.policy-not-authorized", "host:get_all")


async def test_readers_look_but_change_nothing(cloud: Cloud) -> None:
    member = await cloud.token("mia", "team-r")
    reader = await cloud.token("rex", "team-r", role="reader")
    made = await create(cloud, member, zun_template("kept"))
    assert await names(cloud, reader) == {"kept"}
    response = await cloud.client.get(f"/v1/capsules/{made['uuid']}", headers=token_headers(reader))
    assert response.status == 200
    response = await cloud.client.post(
        "/v1/capsules", json={"template": zun_template("new")}, headers=token_headers(reader)
    )
    await assert_error(response, 403, "container.policy-not-authorized", "capsule:create")
    response = await cloud.client.delete(
        f"/v1/capsules/{made['uuid']}", headers=token_headers(reader)
    )
    await assert_error(response, 403, "container.policy-not-authorized", "capsule:delete")
    assert await names(cloud, member) == {"kept"}


POD_WITH_RUNTIME = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "sandboxed"},
    "spec": {"runtimeClassName": "crun", "containers": [{"name": "a", "image": "busybox"}]},
}


async def test_operator_rules_replace_the_defaults(make_cloud: CloudFactory) -> None:
    cloud = await make_cloud(
        policy=PolicyConfig(capsule_runtime=("admin",), capsule_image_pull_policy=("admin",))
    )
    member = await cloud.token("mia", "team-r")
    admin = await cloud.token("root", "team-r", role="admin")
    response = await cloud.client.post(
        "/v1/capsules", json={"template": POD_WITH_RUNTIME}, headers=token_headers(member)
    )
    await assert_error(
        response, 403, "container.policy-not-authorized", "capsule:create:runtime", "admin"
    )
    always = zun_template("pull")
    always["spec"]["containers"][0]["imagePullPolicy"] = "Always"
    response = await cloud.client.post(
        "/v1/capsules", json={"template": always}, headers=token_headers(member)
    )
    await assert_error(
        response, 403, "container.policy-not-authorized", "capsule:create:image_pull_policy"
    )
    # Nothing half-made: the refused capsules do not exist.
    assert await names(cloud, member) == set()
    await create(cloud, admin, POD_WITH_RUNTIME)
    await create(cloud, admin, always)
    # A member with the defaults' IfNotPresent is not concerned by the rule.
    await create(cloud, member, zun_template("plain"))
    assert await names(cloud, member) == {"sandboxed", "pull", "plain"}
