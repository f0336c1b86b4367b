"""Single containers (``/v1/containers``) on a real `capsa up`, driven by the real clients: the
openstack CLI (``appcontainer run|list|show|logs|stop|start|delete``) and ``zun`` (``run``,
``list``, ``logs``, ``delete``), each a sandbox holding one container on containerd, on the network
and in the security group its ``nets`` and ``security_groups`` name."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tests.integration.conftest import CapsaInstance, bridges_for, free_pool
from tests.integration.test_clients import Client
from tests.integration.test_tenant_networks import eventually, ip_of, neutron, never, reaches

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def instance() -> Iterator[CapsaInstance]:
    """capsa of this module's own, on a /22 of its own: /24 default networks, and room for a
    named network's subnet."""
    if os.geteuid() != 0:
        pytest.skip("integration tests need root")
    capsa = CapsaInstance()
    pool = free_pool(22)
    capsa.env.update(CAPSA_NETWORK_DEFAULT_CIDR=pool, CAPSA_NETWORK_DEFAULT_PREFIXLEN="24")
    capsa.cidr = pool
    try:
        capsa.start()
        yield capsa
        capsa.delete_all()
        assert capsa.stop() == 0, capsa.log_tail()
        assert capsa.processes() == [], "capsa up left processes running"
    finally:
        capsa.cleanup()


@pytest.fixture
def tenant(instance: CapsaInstance) -> tuple[Client, dict[str, str]]:
    """A member of a project of its own: their shell, and their token's headers."""
    project, user = f"box-{secrets.token_hex(3)}", f"box-{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(12)
    instance.add_user(user, password, project)
    token = instance.login(user, password, project)
    return Client(instance, user, password, project), {"X-Auth-Token": token}


def container(
    instance: CapsaInstance, ident: str, headers: dict[str, str]
) -> dict[str, Any] | None:
    status, body = instance.request("GET", f"/v1/containers/{ident}", headers=headers)
    if status == 404:
        return None
    assert status == 200, body
    return dict(body)


def wait_status(
    instance: CapsaInstance, ident: str, wanted: str, headers: dict[str, str]
) -> dict[str, Any]:
    deadline = time.monotonic() + 90
    found = None
    while time.monotonic() < deadline:
        found = container(instance, ident, headers)
        if found is not None and found["status"] == wanted and found["task_state"] is None:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{ident} is not {wanted}: {found}\n{instance.log_tail()}")


def wait_gone(instance: CapsaInstance, ident: str, headers: dict[str, str]) -> None:
    deadline = time.monotonic() + 60
    while container(instance, ident, headers) is not None:
        assert time.monotonic() < deadline, f"{ident} is still there\n{instance.log_tail()}"
        time.sleep(0.2)


def test_openstack_appcontainer_runs_a_container_on_a_named_network_and_group(
    instance: CapsaInstance, tenant: tuple[Client, dict[str, str]]
) -> None:
    shell, headers = tenant
    # The project's own network, and a group whose members reach each other.
    pool = ipaddress.ip_network(instance.cidr)
    cidr = str(list(pool.subnets(new_prefix=24))[-1])
    network = neutron(instance, "POST", "/networks", headers, {"network": {"name": "back"}})
    network_id = network["network"]["id"]
    subnet = {"network_id": network_id, "cidr": cidr, "ip_version": 4}
    neutron(instance, "POST", "/subnets", headers, {"subnet": subnet})
    group = neutron(
        instance, "POST", "/security-groups", headers, {"security_group": {"name": "g"}}
    )
    group_id = group["security_group"]["id"]
    rule = {"security_group_id": group_id, "direction": "ingress", "remote_group_id": group_id}
    neutron(instance, "POST", "/security-group-rules", headers, {"security_group_rule": rule})
    # Another pod of that network and group, and one of the project's default network.
    peer = instance.create(
        {
            "kind": "capsule",
            "metadata": {
                "name": "peer",
                "annotations": {"capsa.io/network": "back", "capsa.io/security-groups": "g"},
            },
            "spec": {"containers": [{"image": "busybox", "command": ["sleep", "3600"]}]},
        },
        **headers,
    )
    elsewhere = instance.create(
        {
            "kind": "capsule",
            "metadata": {"name": "elsewhere"},
            "spec": {"containers": [{"image": "busybox", "command": ["sleep", "3600"]}]},
        },
        **headers,
    )

    # Options before the image: what follows it is the command.
    created = json.loads(
        shell.ok(
            "openstack", "appcontainer", "run", "-f", "json", "--name", "box",
            "--net", "network=back", "--security-group", "g", "busybox", "sleep", "3600",
        )
    )  # fmt: skip
    assert created["name"] == "box" and created["status"] == "Creating"
    assert created["security_groups"] == [group_id]
    running = wait_status(instance, "box", "Running", headers)
    address = ip_of(running)
    assert list(running["addresses"]) == [network_id]
    assert ipaddress.ip_address(address) in ipaddress.ip_network(cidr)
    assert running["command"] == ["sleep", "3600"]

    listed = shell.openstack_json("appcontainer", "list")
    assert [(c["uuid"], c["name"], c["status"]) for c in listed] == [
        (created["uuid"], "box", "Running")
    ]
    assert listed[0]["addresses"] == address
    shown = shell.openstack_json("appcontainer", "show", "box")
    assert (shown["uuid"], shown["status"], shown["image"]) == (
        created["uuid"],
        "Running",
        "busybox",
    )
    # A capsule's listing does not show it, nor the container list the capsules.
    assert {c["name"] for c in shell.openstack_json("capsule", "list")} == {"peer", "elsewhere"}
    assert shell.run("openstack", "appcontainer", "logs", "box").returncode == 0

    # On its network: it reaches the other pod of the network, not the project's default one.
    peer_ip = ip_of(instance.wait_status(peer["uuid"], ("Running",), headers=headers))
    other_ip = ip_of(instance.wait_status(elsewhere["uuid"], ("Running",), headers=headers))
    eventually(lambda: reaches(address, peer_ip), "the container reaches the peer")
    eventually(lambda: reaches(peer_ip, address), "the peer reaches the container")
    never(lambda: reaches(address, other_ip), "the container reached another network")

    shell.ok("openstack", "appcontainer", "stop", "box")
    stopped = wait_status(instance, "box", "Stopped", headers)
    shell.ok("openstack", "appcontainer", "start", "box")
    started = wait_status(instance, "box", "Running", headers)
    # The sandbox, hence the address, stayed while it was stopped.
    assert ip_of(started) == ip_of(stopped) == address
    eventually(lambda: reaches(address, peer_ip), "the restarted container reaches the peer")

    refused = shell.run("openstack", "appcontainer", "delete", "box")
    assert "Cannot delete container" in refused.stdout + refused.stderr
    assert container(instance, "box", headers) is not None
    shell.ok("openstack", "appcontainer", "delete", "--stop", "box")
    wait_gone(instance, created["uuid"], headers)
    for capsule in (peer, elsewhere):
        instance.delete(capsule["uuid"])
        instance.wait_gone(capsule["uuid"], headers=headers)

    # Nothing left: no container, no port, no netns holding its address, no bridge.
    assert shell.openstack_json("appcontainer", "list") == []
    assert neutron(instance, "GET", "/ports", headers)["ports"] == []
    eventually(lambda: not bridges_for(cidr), "the network's bridge went with its last port")
    with pytest.raises(AssertionError, match="no netns holds"):
        reaches(address, peer_ip)


def test_zun_runs_lists_reads_the_logs_of_and_deletes_a_container(
    instance: CapsaInstance, tenant: tuple[Client, dict[str, str]]
) -> None:
    shell, headers = tenant
    ran = shell.ok(
        "zun",
        "run",
        "--name",
        "hello",
        "busybox",
        "sh",
        "-c",
        "echo hello from zun; exec sleep 3600",
    )
    assert "hello" in ran
    running = wait_status(instance, "hello", "Running", headers)
    [row] = [line for line in shell.ok("zun", "list").splitlines() if "hello" in line]
    assert running["uuid"] in row and "Running" in row and ip_of(running) in row
    eventually(lambda: "hello from zun" in shell.ok("zun", "logs", "hello"), "the logs")

    deleted = shell.run("zun", "delete", "--stop", "hello")
    assert deleted.returncode == 0, deleted.stderr
    wait_gone(instance, running["uuid"], headers)
    assert "hello" not in shell.ok("zun", "list")
    assert instance.containers() == []
