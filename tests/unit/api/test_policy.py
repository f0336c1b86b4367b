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
from capsa.store import Store

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


async def registries(cloud: Cloud, token: str, query: str = "") -> set[str]:
    response = await cloud.client.get(f"/v1/registries{query}", headers=token_headers(token))
    assert response.status == 200, await response.text()
    return {r["name"] for r in (await response.json())["registries"]}


async def test_readers_see_registries_but_cannot_create_update_or_delete_them(
    cloud: Cloud,
) -> None:
    member = await cloud.token("mia", "team-r")
    reader = await cloud.token("rex", "team-r", role="reader")
    body = {"registry": {"name": "private", "domain": "registry.example.com", "username": "u"}}
    response = await cloud.client.post("/v1/registries", json=body, headers=token_headers(member))
    assert response.status == 201, await response.text()
    made = (await response.json())["registry"]
    assert await registries(cloud, reader) == {"private"}
    response = await cloud.client.get("/v1/registries/private", headers=token_headers(reader))
    assert response.status == 200
    other = {"registry": {"name": "mine", "domain": "registry.example.com"}}
    response = await cloud.client.post("/v1/registries", json=other, headers=token_headers(reader))
    await assert_error(
        response, 403, "container.policy-not-authorized", "registry:create", "admin, member"
    )
    response = await cloud.client.patch(
        f"/v1/registries/{made['uuid']}",
        json={"registry": {"username": "changed"}},
        headers=token_headers(reader),
    )
    await assert_error(response, 403, "container.policy-not-authorized", "registry:update")
    response = await cloud.client.delete(
        f"/v1/registries/{made['uuid']}", headers=token_headers(reader)
    )
    await assert_error(response, 403, "container.policy-not-authorized", "registry:delete")
    # Nothing changed.
    response = await cloud.client.get("/v1/registries/private", headers=token_headers(member))
    assert (await response.json())["registry"]["username"] == "u"
    assert await registries(cloud, member) == {"private"}


async def test_another_projects_registry_is_404_and_unlisted_but_admins_reach_it(
    cloud: Cloud,
) -> None:
    alice = await cloud.token("alice", "team-a")
    bob = await cloud.token("bob", "team-b")
    admin = await cloud.token("root", "admins", role="admin")
    body = {"registry": {"name": "alices", "domain": "registry.example.com"}}
    response = await cloud.client.post("/v1/registries", json=body, headers=token_headers(alice))
    assert response.status == 201
    uuid = (await response.json())["registry"]["uuid"]
    assert await registries(cloud, bob) == set()
    for ident in (uuid, "alices"):
        for method in ("GET", "DELETE"):
            response = await cloud.client.request(
                method, f"/v1/registries/{ident}", headers=token_headers(bob)
            )
            await assert_error(response, 404, "container.registry-not-found", ident)
    response = await cloud.client.get("/v1/registries?all_projects=1", headers=token_headers(bob))
    await assert_error(
        response, 403, "container.policy-not-authorized", "registry:get_all_all_projects"
    )
    assert await registries(cloud, admin) == set()
    assert await registries(cloud, admin, "?all_projects=1") == {"alices"}
    response = await cloud.client.get(f"/v1/registries/{uuid}", headers=token_headers(admin))
    assert response.status == 200


async def test_quotas_a_project_reads_its_own_and_admins_change_them(cloud: Cloud) -> None:
    member = await cloud.token("mia", "team-q")
    reader = await cloud.token("rex", "team-q", role="reader")
    admin = await cloud.token("root", "admins", role="admin")
    team_q = (await cloud.project("team-q")).id
    team_b = (await cloud.project("team-b")).id
    for token in (member, reader):
        for path in (f"/v1/quotas/{team_q}?usages=true", f"/v1/quotas/{team_q}/defaults"):
            response = await cloud.client.get(path, headers=token_headers(token))
            assert response.status == 200, await response.text()
    response = await cloud.client.get(f"/v1/quotas/{team_b}", headers=token_headers(member))
    await assert_error(
        response, 403, "container.policy-not-authorized", "another project's quotas", "admin"
    )
    for method, path, body in (
        ("PUT", f"/v1/quotas/{team_q}", {"containers": 100}),
        ("DELETE", f"/v1/quotas/{team_q}", None),
        ("GET", "/v1/quota_classes/default", None),
        ("PUT", "/v1/quota_classes/default", {"containers": 100}),
    ):
        response = await cloud.client.request(
            method, path, json=body, headers=token_headers(member)
        )
        await assert_error(response, 403, "container.policy-not-authorized", "quota")
    response = await cloud.client.get(f"/v1/quotas/{team_q}", headers=token_headers(member))
    assert (await response.json())["containers"] != 100
    response = await cloud.client.put(
        f"/v1/quotas/{team_q}", json={"containers": 7}, headers=token_headers(admin)
    )
    assert response.status == 200, await response.text()
    response = await cloud.client.get(f"/v1/quotas/{team_q}", headers=token_headers(reader))
    assert (await response.json())["containers"] == 7
    response = await cloud.client.get("/v1/quota_classes/default", headers=token_headers(admin))
    assert response.status == 200


async def test_operator_rules_for_registries_and_quotas(make_cloud: CloudFactory) -> None:
    cloud = await make_cloud(
        policy=PolicyConfig(registry_change=("admin",), quota_change=("admin", "member"))
    )
    member = await cloud.token("mia", "team-r")
    body = {"registry": {"name": "private", "domain": "registry.example.com"}}
    response = await cloud.client.post("/v1/registries", json=body, headers=token_headers(member))
    await assert_error(response, 403, "container.policy-not-authorized", "registry:create")
    team_r = (await cloud.project("team-r")).id
    response = await cloud.client.put(
        f"/v1/quotas/{team_r}", json={"containers": 3}, headers=token_headers(member)
    )
    assert response.status == 200, await response.text()


def privileged_template(name: str) -> dict[str, Any]:
    template = zun_template(name)
    template["spec"]["containers"].append({"image": "busybox", "privileged": True})
    return template


async def test_privileged_capsules_are_refused_until_an_admin_allows_the_project(
    cloud: Cloud, store: Store
) -> None:
    member = await cloud.token("mia", "team-p")
    admin = await cloud.token("root", "team-p", role="admin")
    other = await cloud.token("olga", "team-o")
    team_p = (await cloud.project("team-p")).id
    for token in (member, admin):
        response = await cloud.client.post(
            "/v1/capsules",
            json={"template": privileged_template("priv")},
            headers=token_headers(token),
        )
        await assert_error(
            response,
            403,
            "container.policy-not-authorized",
            "capsule:create:privileged",
            f"project {team_p} may not run privileged containers",
            f"capsa project set {team_p} --allow-privileged",
        )
    assert await names(cloud, member) == set()

    assert await store.privileged.set_allowed(team_p, True)
    made = await create(cloud, member, privileged_template("priv"))
    assert [c["privileged"] for c in made["containers"]] == [False, True]
    response = await cloud.client.get(f"/v1/capsules/{made['uuid']}", headers=token_headers(member))
    assert [c["privileged"] for c in (await response.json())["containers"]] == [False, True]
    # Another project is not concerned.
    response = await cloud.client.post(
        "/v1/capsules", json={"template": privileged_template("x")}, headers=token_headers(other)
    )
    await assert_error(response, 403, "container.policy-not-authorized", "privileged")
    # Forbidden again: new ones are refused, the one made stays.
    assert await store.privileged.set_allowed(team_p, False)
    response = await cloud.client.post(
        "/v1/capsules",
        json={"template": privileged_template("again")},
        headers=token_headers(member),
    )
    await assert_error(response, 403, "container.policy-not-authorized", "privileged")
    assert await names(cloud, member) == {"priv"}


async def test_operator_rules_for_privileged_containers_and_admin_only_fields(
    make_cloud: CloudFactory, store: Store
) -> None:
    cloud = await make_cloud(
        policy=PolicyConfig(
            capsule_privileged=("admin",),
            capsule_runtime=("admin",),
            capsule_image_pull_policy=("admin",),
        )
    )
    member = await cloud.token("mia", "team-p")
    admin = await cloud.token("root", "team-p", role="admin")
    await store.privileged.set_allowed((await cloud.project("team-p")).id, True)
    response = await cloud.client.post(
        "/v1/capsules", json={"template": privileged_template("m")}, headers=token_headers(member)
    )
    await assert_error(
        response, 403, "container.policy-not-authorized", "capsule:create:privileged", "admin"
    )
    made = await create(cloud, admin, privileged_template("a"))
    hidden = {"privileged", "runtime", "image_pull_policy"}
    assert all(hidden <= set(c) for c in made["containers"])
    # Members see neither these fields nor hosts, as in Zun.
    response = await cloud.client.get(f"/v1/capsules/{made['uuid']}", headers=token_headers(member))
    shown = await response.json()
    assert "host" not in shown
    assert all(not (hidden | {"host"}) & set(c) for c in shown["containers"])
    response = await cloud.client.get("/v1/capsules", headers=token_headers(member))
    [listed] = (await response.json())["capsules"]
    assert all(not hidden & set(c) for c in listed["containers"])
