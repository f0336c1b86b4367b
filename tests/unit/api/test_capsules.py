from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from tests.unit.api.api_helpers import (
    ADMIN,
    BASE_URL,
    Client,
    api_headers,
    assert_error,
    create,
    shown,
    zun_template,
)
from tests.unit.conftest import network_with_subnet

from capsa.model.capsule import Capsule, Status
from capsa.model.network import Attachment
from capsa.network.service import NetworkService
from capsa.store import Store

TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "pod-web", "labels": {"NodeName": "vk-1"}},
    "spec": {
        "containers": [
            {
                "name": "app",
                "image": "busybox",
                "resources": {"requests": {"cpu": "500m", "memory": "64Mi"}},
            }
        ]
    },
}


async def count(store: Store) -> int:
    return await store.capsules.count(None)


async def test_create_answers_202_with_location_and_the_capsule(
    client: Client, store: Store
) -> None:
    response = await client.post(
        "/v1/capsules", json={"template": zun_template()}, headers=api_headers()
    )
    assert response.status == 202
    body = await response.json()
    assert response.headers["Location"] == f"{BASE_URL}/v1/capsules/{body['uuid']}"
    assert body["name"] == "web"
    assert body["status"] == "Creating"
    assert body["task_state"] == "scheduling"
    assert body["project_id"] == "default" and body["user_id"] == "default"
    stored = await store.capsules.get(body["uuid"])
    assert stored is not None and stored.name == "web"
    assert [c.uuid for c in stored.containers] == [c["uuid"] for c in body["containers"]]


async def test_a_template_given_as_a_string_is_accepted(client: Client, store: Store) -> None:
    body = await create(client, json.dumps(zun_template(name="from-string")))
    assert body["name"] == "from-string"
    assert await count(store) == 1


async def test_a_pod_manifest_is_accepted(client: Client, store: Store) -> None:
    body = await create(client, POD)
    assert body["name"] == "pod-web"
    assert body["labels"] == {"NodeName": "vk-1"}
    assert body["cpu"] == 0.5 and body["memory"] == "64"
    assert body["containers"][0]["name"] == "app"


async def test_a_template_without_name_gets_one(client: Client, store: Store) -> None:
    body = await create(client, zun_template(name=None))
    assert body["name"].startswith("capsule-")
    again = await create(client, zun_template(name=None))
    assert again["name"] != body["name"]


async def test_containers_without_requests_get_the_configured_defaults(client: Client) -> None:
    body = await create(client, zun_template())
    [container] = body["containers"]
    assert container["cpu"] == 0.25
    assert container["memory"] == "96"
    assert body["cpu"] == 0.25 and body["memory"] == "96"


async def test_a_name_clash_in_the_project_is_409_and_other_projects_may_reuse_it(
    client: Client, store: Store
) -> None:
    await create(client, zun_template(name="dup"))
    response = await client.post(
        "/v1/capsules", json={"template": zun_template(name="dup")}, headers=api_headers()
    )
    await assert_error(response, 409, "container.capsule-already-exists", "dup")
    await create(client, zun_template(name="dup"), headers=api_headers(project="other"))
    assert await count(store) == 2


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        (zun_template(containers=[]), "template.spec.containers"),
        (zun_template(volumes=[{"name": "v", "cinder": {"size": 1}}]), "not supported yet"),
        ({**zun_template(), "replicas": 2}, "template.replicas: unknown field"),
        (zun_template(restartPolicy="Sometimes"), "template.spec.restartPolicy"),
        ({**POD, "apiVersion": "v2"}, "template.apiVersion"),
        ("not json", "must be JSON"),
    ],
)
async def test_a_bad_template_is_400_naming_the_field_and_creates_nothing(
    client: Client, store: Store, template: Any, fragment: str
) -> None:
    response = await client.post("/v1/capsules", json={"template": template}, headers=api_headers())
    await assert_error(response, 400, "container.invalid-capsule-template", fragment)
    assert await count(store) == 0


async def test_the_response_has_the_types_gophercloud_decodes(client: Client) -> None:
    template = zun_template(
        restartPolicy="OnFailure",
        initContainers=[{"image": "busybox", "name": "init"}],
        containers=[
            {
                "image": "nginx",
                "name": "nginx",
                "command": ["nginx"],
                "args": ["-g", "daemon off;"],
                "env": {"A": "1"},
                "resources": {"requests": {"cpu": 0.5, "memory": 128}},
                "ports": [{"containerPort": 80}],
            }
        ],
    )
    await create(client, template)
    response = await client.get("/v1/capsules/web", headers=api_headers("1.32"))
    body = await response.json()
    assert TIMESTAMP.fullmatch(body["created_at"]) and TIMESTAMP.fullmatch(body["updated_at"])
    datetime.strptime(body["created_at"], "%Y-%m-%d %H:%M:%S")
    assert body["restart_policy"] == {"Name": "on-failure", "MaximumRetryCount": "0"}
    assert isinstance(body["cpu"], float) and body["cpu"] == 0.5
    assert body["memory"] == "128"
    assert body["labels"] == {"app": "web"} and body["annotations"] == {}
    assert body["addresses"] == {}
    assert [link["rel"] for link in body["links"]] == ["self", "bookmark"]
    assert "host" not in body
    [container] = body["containers"]
    assert container["name"] == "nginx"
    assert container["command"] == ["nginx", "-g", "daemon off;"]
    assert container["memory"] == "128" and container["cpu"] == 0.5
    assert container["ports"] == [80]
    assert container["environment"] == {"A": "1"}
    assert container["restart_policy"] == {"Name": "on-failure", "MaximumRetryCount": "0"}
    assert all(isinstance(v, str) for v in container["restart_policy"].values())
    assert container["status"] == "Creating"
    assert TIMESTAMP.fullmatch(container["created_at"])
    for key, kind in {
        "uuid": str,
        "image": str,
        "labels": dict,
        "security_groups": list,
        "disk": int,
        "auto_remove": bool,
        "interactive": bool,
        "tty": bool,
        "healthcheck": dict,
        "image_pull_policy": str,
    }.items():
        assert isinstance(container[key], kind), key
    for key in ("status_reason", "status_detail", "task_state", "workdir", "hostname"):
        assert key in container
    [init] = body["init_containers"]
    assert init["name"] == "init"
    assert init["restart_policy"] == {"Name": "on-failure", "MaximumRetryCount": "0"}


async def test_below_1_32_capsules_have_zun_legacy_shape(client: Client) -> None:
    created = await create(client, zun_template(), headers=api_headers("1.31"))
    assert created["meta_name"] == "web"
    assert created["meta_labels"] == {"app": "web"}
    assert created["restart_policy"] == "always"
    assert created["containers_uuids"] == [c["uuid"] for c in created["containers"]]
    assert created["capsule_version"] == "" and created["volumes_info"] == {}
    assert "name" not in created and "labels" not in created
    response = await client.get("/v1/capsules/web", headers=api_headers(version=None))
    assert (await response.json())["meta_name"] == "web"
    listing = await client.get("/v1/capsules", headers=api_headers("1.1"))
    [item] = (await listing.json())["capsules"]
    assert item["restart_policy"] == "always"


async def test_get_by_uuid_and_by_name(client: Client) -> None:
    created = await create(client, zun_template(name="findme"))
    for ident in (created["uuid"], "findme"):
        for suffix in ("", "/"):
            response = await client.get(f"/v1/capsules/{ident}{suffix}", headers=api_headers())
            assert response.status == 200
            assert (await response.json())["uuid"] == created["uuid"]


async def test_an_unknown_capsule_is_404(client: Client) -> None:
    response = await client.get("/v1/capsules/nothing", headers=api_headers())
    await assert_error(response, 404, "container.capsule-not-found", "nothing")


async def test_capsules_of_other_projects_are_invisible(client: Client) -> None:
    theirs = await create(client, zun_template(name="theirs"), headers=api_headers(project="b"))
    for ident in (theirs["uuid"], "theirs"):
        response = await client.get(f"/v1/capsules/{ident}", headers=api_headers(project="a"))
        await assert_error(response, 404, "container.capsule-not-found")
        response = await client.delete(f"/v1/capsules/{ident}", headers=api_headers(project="a"))
        await assert_error(response, 404, "container.capsule-not-found")
    listing = await client.get("/v1/capsules", headers=api_headers(project="a"))
    assert (await listing.json())["capsules"] == []


async def test_admins_see_hosts_and_reach_other_projects(client: Client, store: Store) -> None:
    theirs = await create(client, zun_template(name="theirs"), headers=api_headers(project="b"))
    response = await client.get("/v1/capsules/theirs", headers=ADMIN)
    assert response.status == 200
    body = await response.json()
    assert body["uuid"] == theirs["uuid"]
    assert body["host"] is None
    assert body["containers"][0]["host"] is None


async def test_all_projects_is_for_admins_only(client: Client) -> None:
    await create(client, zun_template(name="a1"), headers=api_headers(project="a"))
    await create(client, zun_template(name="b1"), headers=api_headers(project="b"))
    response = await client.get("/v1/capsules?all_projects=true", headers=api_headers(project="a"))
    await assert_error(response, 403, "container.policy-not-authorized", "all_projects")
    response = await client.get("/v1/capsules?all_projects=1", headers=ADMIN)
    assert sorted(c["name"] for c in (await response.json())["capsules"]) == ["a1", "b1"]
    response = await client.get("/v1/capsules", headers=ADMIN)
    assert (await response.json())["capsules"] == []
    response = await client.get("/v1/capsules?all_projects=maybe", headers=ADMIN)
    await assert_error(response, 400, "container.invalid-value", "all_projects")


async def test_an_admin_deletes_another_projects_capsule_but_not_an_ambiguous_name(
    client: Client,
) -> None:
    ours = await create(client, zun_template(name="same"), headers=api_headers(project="a"))
    theirs = await create(client, zun_template(name="same"), headers=api_headers(project="b"))
    response = await client.delete("/v1/capsules/same?all_projects=true", headers=ADMIN)
    await assert_error(response, 409, "container.conflict", "uuid")
    for capsule, project in ((ours, "a"), (theirs, "b")):
        response = await client.get(
            f"/v1/capsules/{capsule['uuid']}", headers=api_headers(project=project)
        )
        assert (await response.json())["status"] == "Creating", "a 409 deletes nothing"

    response = await client.delete(f"/v1/capsules/{theirs['uuid']}", headers=ADMIN)
    assert response.status == 204
    response = await client.get(f"/v1/capsules/{theirs['uuid']}", headers=api_headers(project="b"))
    await assert_error(response, 404, "container.capsule-not-found")
    response = await client.get(f"/v1/capsules/{ours['uuid']}", headers=api_headers(project="a"))
    assert response.status == 200


async def test_list_pages_with_limit_marker_and_next(client: Client) -> None:
    names = [f"c{i}" for i in range(5)]
    for name in names:
        await create(client, zun_template(name=name))
    seen: list[str] = []
    url: str | None = "/v1/capsules?limit=2&sort_key=name&sort_dir=desc"
    pages = 0
    while url:
        response = await client.get(url, headers=api_headers())
        assert response.status == 200
        body = await response.json()
        seen += [c["name"] for c in body["capsules"]]
        pages += 1
        url = body["next"]
        if url:
            parts = urlsplit(url)
            assert f"{parts.scheme}://{parts.netloc}" == BASE_URL
            assert parts.path == "/v1/capsules/"
            query = parse_qs(parts.query)
            assert query["limit"] == ["2"]
            assert query["sort_key"] == ["name"] and query["sort_dir"] == ["desc"]
            url = f"{parts.path}?{parts.query}"
    assert seen == sorted(names, reverse=True)
    assert pages == 3


async def test_list_defaults_to_creation_order_and_max_limit(
    make_client: Any, store: Store
) -> None:
    client = await make_client(max_limit=3)
    for name in ("z", "y", "x", "w"):
        await create(client, zun_template(name=name))
    response = await client.get("/v1/capsules?limit=100", headers=api_headers())
    body = await response.json()
    assert [c["name"] for c in body["capsules"]] == ["z", "y", "x"]
    assert parse_qs(urlsplit(body["next"]).query)["limit"] == ["3"]
    response = await client.get("/v1/capsules", headers=api_headers())
    assert len((await response.json())["capsules"]) == 3


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("limit=0", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("sort_key=color", "sort_key"),
        ("sort_dir=up", "sort_dir"),
        ("marker=00000000-0000-0000-0000-000000000000", "marker"),
    ],
)
async def test_bad_list_parameters_are_400(client: Client, query: str, fragment: str) -> None:
    response = await client.get(f"/v1/capsules?{query}", headers=api_headers())
    await assert_error(response, 400, "container.invalid-value", fragment)


async def test_delete_is_204_and_the_capsule_is_gone(client: Client, store: Store) -> None:
    created = await create(client, zun_template())
    response = await client.delete("/v1/capsules/web", headers=api_headers())
    assert response.status == 204
    assert await response.read() == b""
    response = await client.get(f"/v1/capsules/{created['uuid']}", headers=api_headers())
    await assert_error(response, 404, "container.capsule-not-found")


async def test_delete_of_a_placed_capsule_is_asynchronous(client: Client, store: Store) -> None:
    created = await create(client, zun_template())
    await store.hosts.register("h1", "http://127.0.0.1:1", 4000, 4096, ("runc",))
    assert await store.hosts.claim(created["uuid"], "h1", 250, 96)
    response = await client.delete(f"/v1/capsules/{created['uuid']}/", headers=api_headers())
    assert response.status == 204
    response = await client.get("/v1/capsules/web", headers=api_headers())
    body = await response.json()
    assert body["status"] == "Deleting"
    assert body["task_state"] == "container_deleting"
    assert await store.capsules.remove(created["uuid"])
    response = await client.get("/v1/capsules/web", headers=api_headers())
    assert response.status == 404


async def test_status_addresses_and_host_as_the_agent_reports_them(
    client: Client, store: Store
) -> None:
    created = await create(client, zun_template())
    await store.hosts.register("h1", "http://127.0.0.1:1", 4000, 4096, ("runc",))
    assert await store.hosts.claim(created["uuid"], "h1", 250, 96)
    [port] = await NetworkService(store, "10.9.0.0/24", 1500).allocate_ports(
        created["uuid"], "default", "h1"
    )
    await store.capsules.update_status(
        created["uuid"], status=Status.RUNNING, task_state=None, status_reason=None
    )
    [container] = created["containers"]
    await store.capsules.update_container(
        container["uuid"], status=Status.RUNNING, started_at=datetime(2024, 5, 1, 12, 0, 0)
    )
    response = await client.get("/v1/capsules/web", headers=ADMIN)
    body = await response.json()
    assert body["status"] == "Running" and body["task_state"] is None
    assert body["host"] == "h1"
    assert body["addresses"] == {
        port.network_id: [
            {
                "addr": str(port.ip_address),
                "version": 4,
                "port": port.id,
                "subnet_id": port.subnet_id,
                "preserve_on_delete": False,
            }
        ]
    }
    [shown] = body["containers"]
    assert shown["status"] == "Running"
    assert shown["status_detail"] == "Up since 2024-05-01 12:00:00"
    assert shown["addresses"] == body["addresses"]
    member = await client.get("/v1/capsules/web", headers=api_headers())
    assert "host" not in await member.json()


async def test_a_capsule_on_several_networks_lists_an_address_on_each_in_its_order(
    client: Client, store: Store
) -> None:
    front = await network_with_subnet(store, "default", "front", "10.31.0.0/24")
    back = await network_with_subnet(store, "default", "back", "10.32.0.0/24")
    template = zun_template()
    template["metadata"]["annotations"] = {"capsa.io/network": f"back, {front}"}
    created = await create(client, template)
    await store.hosts.register("h1", "http://127.0.0.1:1", 4000, 4096, ("runc",))
    assert await store.hosts.claim(created["uuid"], "h1", 250, 96)
    stored = await store.capsules.get(created["uuid"])
    assert stored is not None
    ports = await NetworkService(store, "10.9.0.0/24", 1500).allocate_ports(
        created["uuid"], "default", "h1", Attachment.from_annotations(stored.spec.annotations)
    )

    body = await (await client.get("/v1/capsules/web", headers=ADMIN)).json()

    assert list(body["addresses"]) == [back, front]
    assert [a["addr"] for n in body["addresses"].values() for a in n] == [
        str(p.ip_address) for p in ports
    ]
    assert [a["port"] for n in body["addresses"].values() for a in n] == [p.id for p in ports]


@pytest.mark.parametrize(
    ("networks", "fragment"),
    [
        ("back,nowhere", "network nowhere could not be found"),
        ("back, front, back", "is named more than once"),
        (",".join(f"n{i}" for i in range(9)), "at most 8 networks, not 9"),
    ],
)
async def test_networks_a_capsule_cannot_join_are_refused_and_nothing_is_stored(
    client: Client, store: Store, networks: str, fragment: str
) -> None:
    await network_with_subnet(store, "default", "front", "10.31.0.0/24")
    await network_with_subnet(store, "default", "back", "10.32.0.0/24")
    template = zun_template()
    template["metadata"]["annotations"] = {"capsa.io/network": networks}

    response = await client.post("/v1/capsules", json={"template": template}, headers=api_headers())

    await assert_error(response, 400, "container.invalid-capsule-template", fragment)
    assert await count(store) == 0


async def test_a_list_shows_what_changed_since_the_last_list_and_each_caller_its_own_fields(
    client: Client, store: Store
) -> None:
    created = await create(client, zun_template(name="watched"))
    await create(client, zun_template(name="still"))

    async def listed(headers: dict[str, str]) -> dict[str, dict[str, Any]]:
        response = await client.get("/v1/capsules", headers=headers)
        assert response.status == 200
        return {c["name"]: c for c in (await response.json())["capsules"]}

    first = await listed(ADMIN)
    assert first["watched"]["status"] == "Creating"
    assert "host" in first["watched"]
    await store.hosts.register("h1", "http://h1", 1000, 1024, ("runc",))
    assert await store.hosts.claim(created["uuid"], "h1", 250, 96)
    assert await store.capsules.update_status(created["uuid"], status=Status.RUNNING)
    capsule = await store.capsules.get(created["uuid"])
    assert capsule is not None
    await store.capsules.update_container(capsule.containers[0].uuid, status=Status.RUNNING)

    second = await listed(ADMIN)
    assert second["watched"]["status"] == "Running"
    assert second["watched"]["host"] == "h1"
    assert second["watched"]["containers"][0]["status"] == "Running"
    assert second["still"] == first["still"]
    # A change to a container alone shows too.
    await store.capsules.update_container(capsule.containers[0].uuid, status=Status.STOPPED)
    third = await listed(ADMIN)
    assert third["watched"]["containers"][0]["status"] == "Stopped"
    assert third["watched"]["status"] == "Running"
    # A member lists the same capsules in the shape its policy allows: no hosts.
    member = await listed(api_headers())
    assert set(member) == {"watched", "still"}
    assert "host" not in member["watched"]


async def test_a_polled_capsule_reuses_its_body_until_anything_of_it_changes(
    client: Client, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await create(client, zun_template(name="polled"))
    loads: list[str] = []
    load = store.capsules.get

    async def counted_load(uuid: str) -> Capsule | None:
        loads.append(uuid)
        return await load(uuid)

    monkeypatch.setattr(store.capsules, "get", counted_load)

    async def polled(ident: str = "polled") -> dict[str, Any]:
        return await shown(client, f"/v1/capsules/{ident}", ADMIN)

    first = await polled()
    assert await polled(created["uuid"]) == await polled() == first
    assert len(loads) == 1, "polls of an unchanged capsule encode it once"

    await store.hosts.register("h1", "http://127.0.0.1:1", 4000, 4096, ("runc",))
    assert await store.hosts.claim(created["uuid"], "h1", 250, 96)
    placed = await polled()
    assert placed["host"] == "h1" and placed["task_state"] == "network_attaching"
    [container] = created["containers"]
    await store.capsules.update_container(container["uuid"], status=Status.RUNNING)
    assert (await polled())["containers"][0]["status"] == "Running"
    [port] = await NetworkService(store, "10.9.0.0/24", 1500).allocate_ports(
        created["uuid"], "default", "h1"
    )
    assert (await polled())["addresses"][port.network_id][0]["addr"] == str(port.ip_address)
    assert len(loads) == 4


async def test_a_kept_body_is_not_served_across_microversions_policies_or_projects(
    client: Client,
) -> None:
    created = await create(client, zun_template(name="kept"), headers=api_headers(project="a"))

    owner = api_headers(project="a")
    current = await shown(client, "/v1/capsules/kept", owner)
    assert current["name"] == "kept" and "meta_name" not in current and "host" not in current
    legacy = await shown(client, "/v1/capsules/kept", api_headers("1.31", project="a"))
    assert legacy["meta_name"] == "kept" and "name" not in legacy
    assert await shown(client, "/v1/capsules/kept", owner) == current
    # An admin of another project reaches it, with the fields an admin sees.
    path = f"/v1/capsules/{created['uuid']}"
    admin = await shown(client, path, api_headers(project="b", roles="admin"))
    assert admin["uuid"] == created["uuid"] and admin["host"] is None
    # Other projects' members find nothing, by uuid or by name, though its body is kept.
    for ident in (created["uuid"], "kept"):
        response = await client.get(f"/v1/capsules/{ident}", headers=api_headers(project="b"))
        await assert_error(response, 404, "container.capsule-not-found", ident)
