"""The exact requests of gophercloud (openstack.AuthenticatedClient, NewContainerV1, capsules.*)
as Virtual Kubelet's OpenStack provider (microversion 1.32) sends them, and the answers decoded
by gophercloud's rules: a Go field of type string, float64, int, bool, map[string]string or
[]int accepts only that JSON type (or null), times are "2006-01-02 15:04:05", Create accepts 202
only, Get 200 or 203, Delete 202 or 204, and a page's ``next`` ends the listing when null."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from tests.unit.api.identity_helpers import Cloud, cheap_password_hashes, cloud, make_cloud

from capsa.model.capsule import Status
from capsa.network.service import NetworkService
from capsa.store import Store

__all__ = ["cheap_password_hashes", "cloud", "make_cloud"]

NODE = "vk-node-1"
# gophercloud's JSONRFC3339ZNoTNoZ.
GO_TIME = "%Y-%m-%d %H:%M:%S"


def go_string(value: Any) -> None:
    assert value is None or isinstance(value, str), value


def go_float(value: Any) -> None:
    assert value is None or (isinstance(value, int | float) and not isinstance(value, bool)), value


def go_int(value: Any) -> None:
    assert value is None or (isinstance(value, int) and not isinstance(value, bool)), value


def go_bool(value: Any) -> None:
    assert value is None or isinstance(value, bool), value


def go_string_map(value: Any) -> None:
    assert value is None or (
        isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    ), value


def go_time(value: Any) -> None:
    if value not in (None, ""):
        datetime.strptime(value, GO_TIME)


def decode_address(address: dict[str, Any]) -> None:
    go_bool(address["preserve_on_delete"])
    go_string(address["addr"])
    go_string(address["port"])
    go_float(address["version"])
    go_string(address["subnet_id"])


def decode_container(container: dict[str, Any]) -> None:
    """capsules.Container.UnmarshalJSON, field by field."""
    for key in (
        "uuid",
        "user_id",
        "project_id",
        "memory",
        "image",
        "name",
        "host",
        "workdir",
        "image_pull_policy",
        "task_state",
        "hostname",
        "status",
        "status_detail",
        "status_reason",
        "image_driver",
        "runtime",
    ):
        go_string(container.get(key))
    go_float(container["cpu"])
    go_int(container.get("disk"))
    for key in ("auto_remove", "auto_heal", "interactive"):
        go_bool(container.get(key))
    for key in ("labels", "environment", "restart_policy"):
        go_string_map(container.get(key))
    assert all(isinstance(c, str) for c in container["command"] or [])
    assert all(isinstance(p, int) for p in container["ports"] or [])
    assert all(isinstance(g, str) for g in container["security_groups"] or [])
    for key in ("created_at", "updated_at", "started_at"):
        go_time(container.get(key))
    for addresses in (container.get("addresses") or {}).values():
        for address in addresses:
            decode_address(address)


def decode_capsule_v132(capsule: dict[str, Any]) -> None:
    """capsules.CapsuleV132.UnmarshalJSON, field by field."""
    for key in (
        "uuid",
        "user_id",
        "project_id",
        "memory",
        "name",
        "status",
        "status_reason",
        "host",
    ):
        go_string(capsule.get(key))
    go_float(capsule["cpu"])
    go_string_map(capsule["restart_policy"])
    go_string_map(capsule["labels"])
    go_time(capsule["created_at"])
    go_time(capsule["updated_at"])
    assert isinstance(capsule["links"], list)
    for addresses in capsule["addresses"].values():
        for address in addresses:
            decode_address(address)
    for container in capsule["containers"]:
        decode_container(container)


def vk_template(namespace: str, pod: str) -> str:
    """The template Virtual Kubelet's CreatePod marshals (json.MarshalIndent, its field order and
    omitempty), which gophercloud sends as a string."""
    template = {
        "spec": {
            "containers": [
                {
                    "image": "busybox",
                    "command": ["sh", "-c", "httpd -f -p 80"],
                    "workDir": "/www",
                    "env": {"GREETING": "hello"},
                    "resources": {},
                    "imagePullPolicy": "IfNotPresent",
                }
            ]
        },
        "kind": "capsule",
        "metadata": {
            "labels": {
                "PodName": pod,
                "ClusterName": "",
                "NodeName": NODE,
                "Namespace": namespace,
                "UID": "6a0b2c8e-1111-4222-8333-944455556666",
                "CreationTimestamp": "2024-05-01 12:00:00 +0000 UTC",
            },
            "name": f"{namespace}-{pod}",
        },
    }
    return json.dumps(template, indent=2)


async def gophercloud_login(cloud: Cloud) -> tuple[str, str]:
    """openstack.AuthenticatedClient(AuthOptionsFromEnv()) then NewContainerV1: the token, and
    the public container endpoint of the region, from the catalog."""
    body = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {
                        "name": "vk",
                        "password": "correct horse battery staple",
                        "domain": {"name": "Default"},
                    }
                },
            },
            "scope": {"project": {"name": "k8s", "domain": {"name": "Default"}}},
        }
    }
    response = await cloud.client.post(
        "/v3/auth/tokens",
        data=json.dumps(body),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    assert response.status == 201
    token = response.headers["X-Subject-Token"]
    catalog = (await response.json())["token"]["catalog"]
    [endpoint] = [
        e["url"]
        for service in catalog
        if service["type"] == "container"
        for e in service["endpoints"]
        if e["interface"] == "public" and e["region_id"] == "RegionOne"
    ]
    return token, urlsplit(endpoint).path.rstrip("/") + "/"


async def test_virtual_kubelet_creates_finds_lists_and_deletes_a_pod(
    cloud: Cloud, store: Store
) -> None:
    await cloud.user("vk", "k8s")
    token, base = await gophercloud_login(cloud)
    headers = {
        "X-Auth-Token": token,
        "OpenStack-API-Version": "container 1.32",
        "Accept": "application/json",
        "Content-Type": "application/json",
    }

    # CreatePod: capsules.Create(...).ExtractV132(), OkCodes [202].
    response = await cloud.client.post(
        base + "capsules",
        data=json.dumps({"template": vk_template("default", "web")}),
        headers=headers,
    )
    assert response.status == 202
    assert response.headers["OpenStack-API-Version"] == "container 1.32"
    created = await response.json()
    decode_capsule_v132(created)
    assert created["name"] == "default-web" and created["status"] == "Creating"
    assert created["labels"]["NodeName"] == NODE
    [container] = created["containers"]
    assert container["command"] == ["sh", "-c", "httpd -f -p 80"]
    assert container["workdir"] == "/www" and container["environment"] == {"GREETING": "hello"}
    assert isinstance(container["memory"], str) and int(container["memory"]) > 0

    # The agent runs it: status, address and container start as VK reads them.
    project = await cloud.identity.store.find_project("k8s")
    assert project is not None
    await store.hosts.register("h1", "http://127.0.0.1:1", 4000, 4096, ("runc",))
    assert await store.hosts.claim(created["uuid"], "h1", 100, 64)
    [port] = await NetworkService(store, "10.9.0.0/24", 1500).allocate_ports(
        created["uuid"], project.id, "h1"
    )
    await store.capsules.update_status(
        created["uuid"], status=Status.RUNNING, task_state=None, status_reason=None
    )
    await store.capsules.update_container(
        container["uuid"], status=Status.RUNNING, started_at=datetime(2024, 5, 1, 12, 0, 1)
    )

    # GetPod: capsules.Get(client, "<namespace>-<pod>").ExtractV132(), OkCodes [200, 203].
    response = await cloud.client.get(base + "capsules/default-web", headers=headers)
    assert response.status == 200
    found = await response.json()
    decode_capsule_v132(found)
    assert found["status"] == "Running"
    ipv4 = [a["addr"] for net in found["addresses"].values() for a in net if a["version"] == 4]
    assert ipv4 == [str(port.ip_address)]
    assert found["containers"][0]["status"] == "Running"
    # host is for admins: VK's member user does not see it.
    assert "host" not in found

    # GetPods: capsules.List(client, nil) page by page, ExtractCapsulesV132, keep NodeName's.
    url: str | None = base + "capsules"
    pods = []
    while url:
        response = await cloud.client.get(url, headers=headers)
        assert response.status == 200
        page = await response.json()
        for capsule in page["capsules"]:
            decode_capsule_v132(capsule)
        pods += [c for c in page["capsules"] if c["labels"].get("NodeName") == NODE]
        url = urlsplit(page["next"]).path if page["next"] else None
    assert [p["uuid"] for p in pods] == [created["uuid"]]

    # DeletePod: capsules.Delete (OkCodes 202, 204), then Get every second until 404.
    response = await cloud.client.delete(base + "capsules/default-web", headers=headers)
    assert response.status in (202, 204)
    response = await cloud.client.get(base + "capsules/default-web", headers=headers)
    assert response.status == 200
    assert (await response.json())["status"] == "Deleting"
    await store.capsules.remove(created["uuid"])
    response = await cloud.client.get(base + "capsules/default-web", headers=headers)
    assert response.status == 404
