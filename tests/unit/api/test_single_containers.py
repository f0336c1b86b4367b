"""``/v1/containers``: Zun's single containers at several microversions, their actions as desired
state, their policy and quotas, and the errors Zun answers."""

from __future__ import annotations

from typing import Any

import pytest
from tests.unit.api.api_helpers import (
    ADMIN,
    Client,
    StubAgent,
    api_headers,
    assert_error,
    create,
    shown,
    zun_template,
)

from capsa.model.capsule import CapsuleKind, DesiredState, RestartPolicy, Status
from capsa.model.network import NETWORK_ANNOTATION, SECURITY_GROUPS_ANNOTATION
from capsa.store import Store

MEMBER = api_headers()
READER = api_headers(roles="reader")


async def run(
    client: Client,
    body: dict[str, Any],
    version: str = "1.40",
    headers: dict[str, str] | None = None,
    run: bool = True,
) -> dict[str, Any]:
    response = await client.post(
        "/v1/containers" + ("?run=true" if run else ""),
        json=body,
        headers=headers or api_headers(version),
    )
    assert response.status == 202, await response.text()
    created: dict[str, Any] = await response.json()
    assert response.headers["Location"].endswith(f"/v1/containers/{created['uuid']}")
    return created


async def placed(store: Store, uuid: str, status: Status = Status.RUNNING) -> None:
    """The container as its agent would leave it: on host h1, in ``status``."""
    await store.hosts.register("h1", "http://127.0.0.1:9", 4000, 4096, ("runc",))
    stored = await store.capsules.get(uuid)
    assert stored is not None
    assert await store.hosts.claim(uuid, "h1", stored.spec.cpu_millis, stored.spec.memory_mb)
    assert await store.capsules.update_status(
        uuid, expect=stored.desired_state, status=status, task_state=None
    )


async def test_run_at_1_40_answers_zuns_container_and_stores_a_capsule_of_kind_container(
    client: Client, store: Store
) -> None:
    body = {
        "name": "web",
        "image": "busybox",
        "command": ["sleep", "3600"],
        "entrypoint": ["/bin/sh", "-c"],
        "cpu": "0.5",
        "memory": "256",
        "environment": {"A": "1"},
        "labels": {"team": "a"},
        "workdir": "/tmp",
        "restart_policy": {"Name": "on-failure", "MaximumRetryCount": "3"},
        "hostname": "webhost",
        "interactive": True,
        "tty": True,
        "auto_remove": False,
        "nets": [],
        "mounts": [],
        "hints": {},
        "exposed_ports": {"80/tcp": {}, "53/udp": {}},
    }
    created = await run(client, body)

    assert created["name"] == "web" and created["image"] == "busybox"
    assert created["command"] == ["sleep", "3600"]
    assert created["entrypoint"] == ["/bin/sh", "-c"]
    assert (created["cpu"], created["memory"]) == (0.5, "256")
    assert created["environment"] == {"A": "1"} and created["labels"] == {"team": "a"}
    assert created["restart_policy"] == {"Name": "on-failure", "MaximumRetryCount": "3"}
    assert (created["hostname"], created["workdir"]) == ("webhost", "/tmp")
    assert (created["interactive"], created["tty"], created["auto_remove"]) == (True, True, False)
    assert created["ports"] == [80, 53]
    assert (created["status"], created["task_state"]) == ("Creating", "scheduling")
    assert created["links"][0]["href"].endswith(f"/v1/containers/{created['uuid']}")
    assert created["security_groups"] == [] and created["addresses"] == {}
    assert "host" not in created  # admin-only

    stored = await store.capsules.get(created["uuid"])
    assert stored is not None
    assert stored.spec.kind is CapsuleKind.CONTAINER
    assert stored.desired_state is DesiredState.RUNNING
    (container,) = stored.containers
    assert container.uuid == stored.uuid
    # Docker's command is CRI's args, its entrypoint CRI's command.
    assert container.spec.args == ("sleep", "3600")
    assert container.spec.command == ("/bin/sh", "-c")
    assert (container.spec.cpu_millis, container.spec.memory_mb) == (500, 256)
    assert (stored.spec.restart_policy, stored.spec.max_retries) == (RestartPolicy.ON_FAILURE, 3)

    shown = await client.get("/v1/containers/web", headers=MEMBER)
    assert shown.status == 200
    assert (await shown.json())["uuid"] == created["uuid"]


async def test_create_without_run_asks_for_the_container_created_not_running(
    client: Client, store: Store
) -> None:
    created = await run(client, {"image": "busybox"}, run=False)
    stored = await store.capsules.get(created["uuid"])
    assert stored is not None and stored.desired_state is DesiredState.STOPPED
    # Zun's defaults: a generated name, restart policy "no", the configured resources (the
    # tests' capsule.default_cpu and default_memory_mb).
    assert created["name"].startswith("container-")
    assert created["restart_policy"] == {"Name": "no", "MaximumRetryCount": "0"}
    assert (created["cpu"], created["memory"]) == (0.25, "96")


async def test_containers_and_capsules_stay_in_their_own_lists(client: Client) -> None:
    container = await run(client, {"name": "same", "image": "busybox"})
    capsule = await create(client, zun_template(name="same"))

    containers = await (await client.get("/v1/containers", headers=MEMBER)).json()
    capsules = await (await client.get("/v1/capsules", headers=MEMBER)).json()
    assert [c["uuid"] for c in containers["containers"]] == [container["uuid"]]
    assert [c["uuid"] for c in capsules["capsules"]] == [capsule["uuid"]]
    response = await client.get(f"/v1/capsules/{container['uuid']}", headers=MEMBER)
    await assert_error(response, 404, "container.capsule-not-found")
    response = await client.get(f"/v1/containers/{capsule['uuid']}", headers=MEMBER)
    await assert_error(response, 404, "container.container-not-found")


async def test_command_is_a_shell_string_before_1_20_and_a_list_from_it(
    client: Client, store: Store
) -> None:
    created = await run(client, {"image": "busybox", "command": 'sh -c "echo hi"'}, "1.1")
    assert created["command"] == ["sh", "-c", "echo hi"]

    response = await client.post(
        "/v1/containers", json={"image": "busybox", "command": ["sh"]}, headers=api_headers("1.12")
    )
    await assert_error(response, 400, "container.invalid-value", "command", "must be a string")
    response = await client.post(
        "/v1/containers", json={"image": "busybox", "command": "sh"}, headers=api_headers("1.20")
    )
    await assert_error(response, 400, "container.invalid-value", "command", "must be a list")


@pytest.mark.parametrize(
    ("version", "field", "value"),
    [
        ("1.1", "auto_remove", True),
        ("1.4", "runtime", "runc"),
        ("1.8", "hostname", "web"),
        ("1.20", "privileged", False),
        ("1.23", "exposed_ports", {"80/tcp": {}}),
        ("1.30", "registry", "mine"),
        ("1.39", "entrypoint", ["sh"]),
    ],
)
async def test_fields_are_refused_below_the_microversion_that_brought_them(
    client: Client, version: str, field: str, value: Any
) -> None:
    response = await client.post(
        "/v1/containers", json={"image": "busybox", field: value}, headers=api_headers(version)
    )
    await assert_error(
        response, 400, "container.invalid-value", f"{field} is only supported from version"
    )


async def test_interactive_sets_tty_from_1_20_to_1_35_only(client: Client) -> None:
    older = await run(client, {"image": "busybox", "interactive": True}, "1.12")
    middle = await run(client, {"image": "busybox", "interactive": "true"}, "1.20")
    newer = await run(client, {"image": "busybox", "interactive": True}, "1.40")
    assert [c["tty"] for c in (older, middle, newer)] == [False, True, False]
    assert [c["interactive"] for c in (older, middle, newer)] == [True, True, True]


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ({"image": "busybox", "nets": [{"port": "p1"}]}, ("nets[0].port", "not supported")),
        (
            {"image": "busybox", "nets": [{"network": "n", "v4-fixed-ip": "10.0.0.5"}]},
            ("fixed addresses are not supported",),
        ),
        (
            {"image": "busybox", "nets": [{"network": f"n{i}"} for i in range(9)]},
            ("nets", "at most 8 networks"),
        ),
        (
            {"image": "busybox", "nets": [{"network": "a"}, {"port": "p2"}]},
            ("nets[1].port", "not supported"),
        ),
        ({"image": "busybox", "mounts": [{"source": "v", "destination": "/d"}]}, ("volumes",)),
        ({"image": "busybox", "healthcheck": {"cmd": "true"}}, ("health checks",)),
        ({"image": "busybox", "cpu_policy": "dedicated"}, ("dedicated",)),
        ({"image": "busybox", "image_driver": "glance"}, ("image driver",)),
        ({"image": "busybox", "host": "h1"}, ("choosing the host",)),
        ({"image": "busybox", "bogus": 1}, ("bogus", "unknown field")),
        ({"image": "busybox", "cpu": "lots"}, ("cpu",)),
        (
            {"image": "busybox", "restart_policy": {"Name": "always", "MaximumRetryCount": 2}},
            ("maximum retry count not valid",),
        ),
        (
            {"image": "busybox", "security_groups": ["g"], "exposed_ports": {"80": {}}},
            ("security_groups", "exposed_ports"),
        ),
        ({"image": "busybox", "exposed_ports": {"80/sctp": {}}}, ("sctp",)),
    ],
)
async def test_what_capsa_cannot_do_is_refused_with_the_field_and_the_reason(
    client: Client, store: Store, body: dict[str, Any], fragments: tuple[str, ...]
) -> None:
    response = await client.post("/v1/containers", json=body, headers=MEMBER)
    await assert_error(response, 400, "container.invalid-value", *fragments)
    assert await store.capsules.count(None) == 0


async def test_nets_and_security_groups_choose_the_attachment_by_name_or_id(
    client: Client, store: Store
) -> None:
    network = await store.networks.create_network(project_id="default", name="back", mtu=1500)
    group = await store.networks.create_security_group(project_id="default", name="web")
    other = await store.networks.create_network(project_id="other", name="theirs", mtu=1500)

    created = await run(
        client,
        {"image": "busybox", "nets": [{"network": "back"}], "security_groups": ["web", group.id]},
    )
    stored = await store.capsules.get(created["uuid"])
    assert stored is not None
    assert stored.spec.annotations == {
        NETWORK_ANNOTATION: network.id,
        SECURITY_GROUPS_ANNOTATION: group.id,
    }
    assert created["security_groups"] == [group.id]

    # Several networks: the first is its eth0, by id in the annotation, in order.
    front = await store.networks.create_network(project_id="default", name="front", mtu=1500)
    created = await run(
        client, {"image": "busybox", "nets": [{"network": "front"}, {"network": network.id}]}
    )
    stored = await store.capsules.get(created["uuid"])
    assert stored is not None
    assert stored.spec.annotations[NETWORK_ANNOTATION] == f"{front.id},{network.id}"

    for body, fragment in (
        ({"nets": [{"network": other.id}]}, "network"),
        ({"nets": [{"network": "nowhere"}]}, "nowhere"),
        ({"nets": [{"network": "back"}, {"network": network.id}]}, "named more than once"),
        ({"security_groups": ["nobody"]}, "nobody"),
    ):
        response = await client.post(
            "/v1/containers", json={"image": "busybox", **body}, headers=MEMBER
        )
        await assert_error(response, 400, "container.invalid-value", fragment)
    assert await store.capsules.count(None) == 2


async def test_a_single_container_counts_against_the_projects_quota(
    client: Client, store: Store
) -> None:
    response = await client.put(
        "/v1/quotas/default", json={"containers": 2, "memory": 300}, headers=ADMIN
    )
    assert response.status == 200
    await run(client, {"image": "busybox", "memory": "200"})

    response = await client.post(
        "/v1/containers", json={"image": "busybox", "memory": 200}, headers=MEMBER
    )
    await assert_error(response, 403, "container.over-quota", "memory: limit 300, in use 200")
    await create(client, zun_template(name="small"))
    response = await client.post("/v1/containers", json={"image": "busybox"}, headers=MEMBER)
    await assert_error(response, 403, "container.over-quota", "containers: limit 2, in use 2")
    assert await store.capsules.count("default") == 2


async def test_names_are_unique_among_a_projects_containers(client: Client) -> None:
    await run(client, {"name": "web", "image": "busybox"})
    response = await client.post(
        "/v1/containers", json={"name": "web", "image": "busybox"}, headers=MEMBER
    )
    await assert_error(response, 409, "container.container-already-exists", "web")
    await run(client, {"name": "web", "image": "busybox"}, headers=api_headers(project="p2"))


async def test_list_filters_pages_and_reaches_every_project_for_admins(client: Client) -> None:
    first = await run(client, {"name": "a", "image": "busybox"})
    second = await run(client, {"name": "b", "image": "nginx", "memory": "128"})
    theirs = await run(client, {"name": "c", "image": "busybox"}, headers=api_headers(project="p2"))

    async def names(query: str, headers: dict[str, str] = MEMBER) -> list[str]:
        response = await client.get(f"/v1/containers?{query}", headers=headers)
        assert response.status == 200, await response.text()
        return [c["name"] for c in (await response.json())["containers"]]

    assert await names("") == ["a", "b"]
    assert await names("image=nginx") == ["b"]
    assert await names("memory=128") == ["b"]
    assert await names("name=a&status=Creating") == ["a"]
    assert await names("auto_remove=false") == ["a", "b"]
    assert await names("project_id=p2") == []
    assert await names("all_projects=1", ADMIN) == ["a", "b", "c"]
    assert await names("all_projects=1&project_id=p2", ADMIN) == ["c"]

    page = await (await client.get("/v1/containers?limit=1&image=busybox", headers=MEMBER)).json()
    assert [c["uuid"] for c in page["containers"]] == [first["uuid"]]
    assert "image=busybox" in page["next"] and f"marker={first['uuid']}" in page["next"]
    assert second["uuid"] != theirs["uuid"]

    response = await client.get("/v1/containers?all_projects=1", headers=MEMBER)
    await assert_error(response, 403, "container.policy-not-authorized")
    response = await client.get("/v1/containers?host=h1", headers=MEMBER)
    await assert_error(response, 403, "container.policy-not-authorized", "get_one:host")
    response = await client.get("/v1/containers?colour=red", headers=MEMBER)
    await assert_error(response, 400, "container.invalid-value", "colour")


async def test_start_stop_reboot_and_kill_are_desired_state_in_zuns_statuses(
    client: Client, store: Store
) -> None:
    created = await run(client, {"name": "web", "image": "busybox"})
    uuid = created["uuid"]

    response = await client.post("/v1/containers/web/stop", headers=MEMBER)
    await assert_error(
        response, 409, "container.invalid-state", f"Cannot stop container {uuid} in Creating"
    )
    await placed(store, uuid)

    response = await client.post("/v1/containers/web/kill?signal=term", headers=MEMBER)
    assert response.status == 202
    stored = await store.capsules.get(uuid)
    assert stored is not None and stored.pending_signal == "SIGTERM"
    response = await client.post("/v1/containers/web/kill?signal=NOPE", headers=MEMBER)
    await assert_error(response, 400, "container.invalid-value", "signal")

    response = await client.post("/v1/containers/web/stop?timeout=3", headers=MEMBER)
    assert response.status == 202
    stored = await store.capsules.get(uuid)
    assert stored is not None
    assert (stored.desired_state, stored.stop_timeout) == (DesiredState.STOPPED, 3)
    assert (await (await client.get("/v1/containers/web", headers=MEMBER)).json())[
        "task_state"
    ] == "container_stopping"

    response = await client.post("/v1/containers/web/start", headers=MEMBER)
    await assert_error(response, 409, "container.invalid-state", "Cannot start", "Running")
    await store.capsules.update_status(uuid, expect=DesiredState.STOPPED, status=Status.STOPPED)
    response = await client.post("/v1/containers/web/start", headers=MEMBER)
    assert response.status == 202
    stored = await store.capsules.get(uuid)
    assert stored is not None
    assert (stored.desired_state, stored.generation) == (DesiredState.RUNNING, 1)

    response = await client.post(f"/v1/containers/{uuid}/reboot?timeout=0", headers=MEMBER)
    assert response.status == 202
    stored = await store.capsules.get(uuid)
    assert stored is not None
    assert (stored.status, stored.generation, stored.stop_timeout) == (Status.RESTARTING, 2, 0)

    response = await client.post("/v1/containers/web/stop?timeout=-1", headers=MEMBER)
    await assert_error(response, 400, "container.invalid-value", "timeout")


async def test_delete_follows_zuns_status_rules_force_and_stop(
    client: Client, store: Store
) -> None:
    unplaced = await run(client, {"name": "early", "image": "busybox"})
    response = await client.delete("/v1/containers/early", headers=MEMBER)
    await assert_error(response, 409, "container.invalid-state", "Cannot delete", "Creating")
    response = await client.delete("/v1/containers/early?force=true", headers=MEMBER)
    await assert_error(response, 403, "container.policy-not-authorized", "delete_force")
    response = await client.delete("/v1/containers/early?force=true", headers=ADMIN)
    assert response.status == 204
    assert await store.capsules.get(unplaced["uuid"]) is None

    running = await run(client, {"name": "web", "image": "busybox"})
    await placed(store, running["uuid"])
    response = await client.delete("/v1/containers/web", headers=MEMBER)
    await assert_error(response, 409, "container.invalid-state", "Running")
    response = await client.delete("/v1/containers/web?stop=true", headers=api_headers("1.11"))
    await assert_error(response, 400, "container.invalid-value", "stop is only supported")
    response = await client.delete("/v1/containers/web?stop=true", headers=MEMBER)
    assert response.status == 204
    stored = await store.capsules.get(running["uuid"])
    assert stored is not None and stored.desired_state is DesiredState.DELETED
    response = await client.post("/v1/containers/web/start", headers=MEMBER)
    await assert_error(response, 409, "container.invalid-state", "Deleting")


async def test_rename_below_1_14_and_patch_from_it(client: Client, store: Store) -> None:
    await run(client, {"name": "old", "image": "busybox"})
    await run(client, {"name": "taken", "image": "busybox"})

    response = await client.post("/v1/containers/old/rename?name=mid", headers=api_headers("1.13"))
    assert response.status == 200
    assert (await response.json())["name"] == "mid"
    response = await client.post("/v1/containers/mid/rename?name=x1", headers=MEMBER)
    await assert_error(response, 501, "container.operation-not-supported", "PATCH")

    response = await client.patch("/v1/containers/mid", json={"name": "new"}, headers=MEMBER)
    assert response.status == 200
    renamed = await response.json()
    assert renamed["name"] == "new"
    stored = await store.capsules.get(renamed["uuid"])
    assert stored is not None and stored.containers[0].spec.name == "new"
    response = await client.patch("/v1/containers/new", json={"name": "taken"}, headers=MEMBER)
    await assert_error(response, 409, "container.container-already-exists", "taken")
    response = await client.patch("/v1/containers/new", json={"name": "new"}, headers=MEMBER)
    await assert_error(response, 409, "container.conflict", "same as the old name")
    response = await client.patch("/v1/containers/new", json={"memory": 512}, headers=MEMBER)
    await assert_error(response, 501, "container.operation-not-supported", "memory")


@pytest.mark.parametrize(
    ("method", "action"),
    [("POST", "pause"), ("POST", "unpause"), ("POST", "execute"), ("GET", "attach"),
     ("POST", "commit"), ("GET", "top"), ("POST", "network_attach")],
)  # fmt: skip
async def test_what_cri_cannot_do_answers_501_with_the_reason(
    client: Client, method: str, action: str
) -> None:
    created = await run(client, {"name": "web", "image": "busybox"})
    response = await client.request(method, f"/v1/containers/web/{action}", headers=MEMBER)
    await assert_error(
        response,
        501,
        "container.operation-not-supported",
        f"Cannot {action} container {created['uuid']}",
    )
    response = await client.request(method, f"/v1/containers/nothing/{action}", headers=MEMBER)
    await assert_error(response, 404, "container.container-not-found")


async def test_policy_readers_look_members_act_and_other_projects_see_nothing(
    client: Client,
) -> None:
    response = await client.post("/v1/containers", json={"image": "busybox"}, headers=READER)
    await assert_error(response, 403, "container.policy-not-authorized", "container:create")
    created = await run(client, {"name": "web", "image": "busybox"})
    assert (await client.get("/v1/containers/web", headers=READER)).status == 200
    for method, path in (
        ("POST", "/v1/containers/web/stop"),
        ("POST", "/v1/containers/web/kill"),
        ("DELETE", "/v1/containers/web"),
        ("PATCH", "/v1/containers/web"),
    ):
        response = await client.request(method, path, json={"name": "x2"}, headers=READER)
        await assert_error(response, 403, "container.policy-not-authorized")

    stranger = api_headers(project="p2")
    for method, path in (
        ("GET", "/v1/containers/web"),
        ("GET", f"/v1/containers/{created['uuid']}"),
        ("GET", f"/v1/containers/{created['uuid']}/logs"),
        ("POST", "/v1/containers/web/start"),
        ("DELETE", f"/v1/containers/{created['uuid']}?force=true"),
        ("PATCH", "/v1/containers/web"),
    ):
        response = await client.request(method, path, json={"name": "x2"}, headers=stranger)
        await assert_error(response, 404, "container.container-not-found")
    # An admin reaches it by name or uuid.
    assert (await client.get("/v1/containers/web", headers=ADMIN)).status == 200


async def test_logs_of_a_single_container_by_name_come_from_its_agent(
    client: Client, store: Store, agent: StubAgent
) -> None:
    created = await run(client, {"name": "web", "image": "busybox"})
    await store.hosts.register("h1", agent.url, 4000, 4096, ("runc",))
    assert await store.hosts.claim(created["uuid"], "h1", 100, 64)

    response = await client.get("/v1/containers/web/logs?tail=5", headers=MEMBER)
    assert response.status == 200
    assert await response.json() == "line 1\nline 2\n"
    assert [q["uuid"] for q in agent.queries] == [created["uuid"]]


async def test_a_polled_container_shows_each_change_in_its_own_shape(
    client: Client, store: Store
) -> None:
    created = await run(client, {"name": "polled", "image": "busybox"})

    async def polled(ident: str = "polled") -> dict[str, Any]:
        return await shown(client, f"/v1/containers/{ident}", ADMIN)

    first = await polled()
    assert first["status"] == "Creating" and first["host"] is None
    assert await polled(created["uuid"]) == first
    # The capsule path of the same uuid does not answer with the container's body.
    response = await client.get(f"/v1/capsules/{created['uuid']}", headers=ADMIN)
    await assert_error(response, 404, "container.capsule-not-found")

    await placed(store, created["uuid"])
    running = await polled()
    assert running["status"] == "Running" and running["host"] == "h1"
    assert running["links"][0]["href"].endswith(f"/v1/containers/{created['uuid']}")
    member = await shown(client, "/v1/containers/polled", MEMBER)
    assert member["status"] == "Running" and "host" not in member
