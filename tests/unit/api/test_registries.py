"""``/v1/registries`` as python-zunclient and the openstack CLI call it."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from tests.unit.api.api_helpers import ADMIN, BASE_URL, Client, api_headers, assert_error

from capsa.secrets import SecretBox
from capsa.store import Store

ALICE = api_headers(project="p1")
BOB = api_headers(project="p2")


async def create(client: Client, headers: dict[str, str] = ALICE, **fields: Any) -> Any:
    body = {"domain": "registry.example.com:5000", **fields}
    response = await client.post("/v1/registries", json={"registry": body}, headers=headers)
    assert response.status == 201, await response.text()
    created = await response.json()
    assert response.headers["Location"] == f"{BASE_URL}/v1/registries/{created['registry']['uuid']}"
    return created["registry"]


async def test_create_answers_201_with_the_password_hidden(client: Client) -> None:
    registry = await create(client, name="private", username="alice", password="s3cret")
    assert set(registry) == {
        "uuid",
        "links",
        "user_id",
        "project_id",
        "name",
        "domain",
        "username",
        "password",
    }
    assert registry["name"] == "private"
    assert registry["domain"] == "registry.example.com:5000"
    assert registry["username"] == "alice"
    assert registry["password"] == "***"
    assert registry["project_id"] == "p1"
    assert registry["links"][0]["href"] == f"{BASE_URL}/v1/registries/{registry['uuid']}"
    minimal = await create(client)
    assert (minimal["name"], minimal["username"], minimal["password"]) == (None, None, "***")


async def test_the_password_is_stored_encrypted_under_the_key_file(
    client: Client, store: Store, tmp_path: Path
) -> None:
    registry = await create(client, name="private", username="alice", password="s3cret-pw")
    with sqlite3.connect(tmp_path / "capsa.db") as db:
        dump = "\n".join(db.iterdump())
    assert "s3cret-pw" not in dump
    stored = await store.registries.get(registry["uuid"])
    assert stored is not None and stored.password_token is not None
    key = tmp_path / "credentials.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert SecretBox.load_or_create(key).decrypt(stored.password_token) == "s3cret-pw"


async def test_show_list_update_and_delete_by_name_or_uuid(
    client: Client, store: Store, tmp_path: Path
) -> None:
    registry = await create(client, name="private", username="alice", password="one")
    response = await client.get("/v1/registries/private", headers=ALICE)
    assert (await response.json())["registry"]["uuid"] == registry["uuid"]
    response = await client.patch(
        f"/v1/registries/{registry['uuid']}",
        json={"registry": {"username": "alice2", "password": "two"}},
        headers=ALICE,
    )
    assert response.status == 200
    updated = (await response.json())["registry"]
    assert (updated["username"], updated["password"], updated["name"]) == (
        "alice2",
        "***",
        "private",
    )
    stored = await store.registries.get(registry["uuid"])
    assert stored is not None and stored.password_token is not None
    box = SecretBox.load_or_create(tmp_path / "credentials.key")
    assert (stored.username, box.decrypt(stored.password_token)) == ("alice2", "two")
    response = await client.get("/v1/registries", headers=ALICE)
    body = await response.json()
    assert [r["uuid"] for r in body["registries"]] == [registry["uuid"]]
    assert body["next"] is None
    response = await client.delete("/v1/registries/private", headers=ALICE)
    assert response.status == 204
    response = await client.get(f"/v1/registries/{registry['uuid']}", headers=ALICE)
    await assert_error(response, 404, "container.registry-not-found", registry["uuid"])


async def test_another_projects_registries_are_404_and_unlisted(client: Client) -> None:
    registry = await create(client, name="private")
    for method in ("GET", "PATCH", "DELETE"):
        for ident in (registry["uuid"], "private"):
            response = await client.request(
                method, f"/v1/registries/{ident}", json={"registry": {}}, headers=BOB
            )
            await assert_error(response, 404, "container.registry-not-found", ident)
    response = await client.get("/v1/registries", headers=BOB)
    assert (await response.json())["registries"] == []
    response = await client.get("/v1/registries?all_projects=1", headers=BOB)
    await assert_error(response, 403, "container.policy-not-authorized")
    response = await client.get("/v1/registries?all_projects=1", headers=ADMIN)
    assert [r["uuid"] for r in (await response.json())["registries"]] == [registry["uuid"]]
    response = await client.get(f"/v1/registries/{registry['uuid']}", headers=ADMIN)
    assert response.status == 200


async def test_lists_page_and_filter(client: Client) -> None:
    made = [await create(client, name=f"r{i}", domain=f"r{i}.example.com") for i in range(3)]
    response = await client.get("/v1/registries?limit=2", headers=ALICE)
    first = await response.json()
    assert [r["name"] for r in first["registries"]] == ["r0", "r1"]
    assert "marker=" in first["next"]
    assert first["next"] == (
        f"{BASE_URL}/v1/registries/?sort_key=id&sort_dir=asc&limit=2&marker={made[1]['uuid']}"
    )
    response = await client.get(first["next"].removeprefix(BASE_URL), headers=ALICE)
    assert [r["name"] for r in (await response.json())["registries"]] == ["r2"]
    response = await client.get("/v1/registries?domain=r1.example.com", headers=ALICE)
    assert [r["uuid"] for r in (await response.json())["registries"]] == [made[1]["uuid"]]
    # The next page of a filtered list keeps the filter.
    response = await client.get("/v1/registries?domain=r1.example.com&limit=1", headers=ALICE)
    assert (await response.json())["next"].startswith(
        f"{BASE_URL}/v1/registries/?domain=r1.example.com&sort_key=id"
    )


async def test_a_name_is_unique_in_its_project(client: Client) -> None:
    await create(client, name="private")
    await create(client, BOB, name="private")
    response = await client.post(
        "/v1/registries", json={"registry": {"name": "private", "domain": "x.io"}}, headers=ALICE
    )
    await assert_error(response, 409, "container.registry-already-exists", "name private")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"registry": {"name": "xy"}}, "registry.domain: required field is missing"),
        ({"registry": {"domain": "https://x.io"}}, "is not a registry domain"),
        ({"registry": {"domain": "x.io", "email": "a@b"}}, "registry.email: unknown field"),
        ({"registry": {"domain": "x.io", "password": ""}}, "registry.password"),
        ({"registry": {"domain": "x.io", "name": "-bad"}}, "registry.name"),
        ({"domain": "x.io"}, "registry: required field is missing"),
        ([1], "Invalid registry: body: "),
    ],
)
async def test_bad_bodies_are_400(client: Client, body: Any, fragment: str) -> None:
    response = await client.post("/v1/registries", json=body, headers=ALICE)
    await assert_error(response, 400, "container.invalid", fragment)
    response = await client.get("/v1/registries", headers=ALICE)
    assert (await response.json())["registries"] == []


def capsule(*containers: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "capsule",
        "metadata": {"name": "app"},
        "spec": {"containers": list(containers)},
    }


async def test_a_zun_container_names_its_registry_and_pulls_from_its_domain(
    client: Client, store: Store
) -> None:
    registry = await create(client, name="private", domain="reg.example.com:5000")
    template = capsule(
        {"name": "a", "image": "team/app:1", "registry": "private"},
        {"name": "b", "image": "reg.example.com:5000/team/app:2", "registry": registry["uuid"]},
        {"name": "c", "image": "busybox"},
    )
    response = await client.post("/v1/capsules", json={"template": template}, headers=ALICE)
    assert response.status == 202, await response.text()
    containers = (await response.json())["containers"]
    assert [(c["image"], c["registry_id"]) for c in containers] == [
        ("reg.example.com:5000/team/app:1", registry["uuid"]),
        ("reg.example.com:5000/team/app:2", registry["uuid"]),
        ("busybox", None),
    ]
    stored = await store.capsules.find("app", "p1")
    assert stored is not None
    assert [c.spec.registry_id for c in stored.containers] == [registry["uuid"]] * 2 + [None]


async def test_an_image_on_a_registrys_domain_uses_it_unnamed(client: Client) -> None:
    first = await create(client, name="first", domain="reg.example.com")
    await create(client, name="second", domain="reg.example.com")
    await create(client, BOB, name="bobs", domain="other.example.com")
    template = capsule(
        {"name": "a", "image": "reg.example.com/app"}, {"name": "b", "image": "other.example.com/x"}
    )
    response = await client.post("/v1/capsules", json={"template": template}, headers=ALICE)
    containers = (await response.json())["containers"]
    # The oldest of the project's registries for the domain; another project's is never used.
    assert [c["registry_id"] for c in containers] == [first["uuid"], None]


async def test_a_pods_image_pull_secrets_choose_among_registries_of_a_domain(
    client: Client,
) -> None:
    await create(client, name="first", domain="reg.example.com")
    chosen = await create(client, name="second", domain="reg.example.com")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "pod"},
        "spec": {
            "imagePullSecrets": [{"name": "second"}],
            "containers": [{"name": "a", "image": "reg.example.com/app"}],
        },
    }
    response = await client.post("/v1/capsules", json={"template": pod}, headers=ALICE)
    assert response.status == 202, await response.text()
    assert (await response.json())["containers"][0]["registry_id"] == chosen["uuid"]


@pytest.mark.parametrize(
    ("container", "pull_secrets", "fragment"),
    [
        (
            {"image": "app", "registry": "nope"},
            None,
            "template.spec.containers[0].registry: there is no registry 'nope' in this project",
        ),
        (
            {"image": "elsewhere.io/app", "registry": "private"},
            None,
            "template.spec.containers[0].image: image 'elsewhere.io/app' is on elsewhere.io, "
            "not on the domain reg.example.com",
        ),
        (
            {"image": "app"},
            [{"name": "bobs"}],
            "template.spec.imagePullSecrets[0].name: there is no registry 'bobs'",
        ),
    ],
)
async def test_a_registry_that_cannot_serve_is_400_and_stores_nothing(
    client: Client, store: Store, container: Any, pull_secrets: Any, fragment: str
) -> None:
    await create(client, name="private", domain="reg.example.com")
    await create(client, BOB, name="bobs", domain="reg.example.com")
    if pull_secrets is None:
        template = capsule({"name": "a", **container})
    else:
        template = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "pod"},
            "spec": {"imagePullSecrets": pull_secrets, "containers": [{"name": "a", **container}]},
        }
    response = await client.post("/v1/capsules", json={"template": template}, headers=ALICE)
    await assert_error(response, 400, "container.invalid-capsule-template", fragment)
    assert await store.capsules.count(None) == 0
