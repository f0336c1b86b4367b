"""The real `openstack` client against capsa's network service: it finds the `network` endpoint in
capsa's catalog and manages networks, subnets, ports, security groups and rules as with Neutron."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from tests.integration.conftest import free_pool
from tests.integration.test_clients import Client

pytestmark = pytest.mark.integration


def test_openstack_manages_networks_subnets_ports_and_security_groups(capsa: Any) -> None:
    name = f"net-{uuid.uuid4().hex[:8]}"
    cidr = free_pool(23).replace("/23", "/24")
    password = uuid.uuid4().hex
    capsa.add_user(name, password, name)
    client = Client(capsa, name, password, name)

    network = client.openstack_json("network", "create", name)
    assert network["name"] == name and network["shared"] is False
    subnet = client.openstack_json(
        "subnet", "create", "--network", name, "--subnet-range", cidr, "--dns-nameserver",
        "10.0.0.53", f"{name}-sub",
    )  # fmt: skip
    assert subnet["cidr"] == cidr and subnet["network_id"] == network["id"]
    group = client.openstack_json("security", "group", "create", f"{name}-web")
    rule = client.openstack_json(
        "security", "group", "rule", "create", "--ingress", "--protocol", "tcp",
        "--dst-port", "80", "--remote-ip", "10.0.0.0/8", group["id"],
    )  # fmt: skip
    assert (rule["port_range_min"], rule["port_range_max"]) == (80, 80)
    port = client.openstack_json(
        "port", "create", "--network", name, "--security-group", group["id"], f"{name}-port"
    )
    [fixed] = port["fixed_ips"]
    assert fixed["subnet_id"] == subnet["id"]

    listed = client.openstack_json("port", "list", "--network", name)
    assert [p["ID"] for p in listed] == [port["id"]]
    shown = client.openstack_json("network", "show", name)
    assert shown["subnets"] == [subnet["id"]]

    # The demo project sees none of it.
    demo = Client(capsa, "demo", capsa.password("demo"), "demo")
    refused = demo.run("openstack", "network", "show", network["id"])
    assert refused.returncode != 0 and "No Network found" in refused.stderr
    # A member cannot share a network.
    shared = client.run("openstack", "network", "set", "--share", name)
    assert shared.returncode != 0 and "403" in shared.stderr

    # Only an admin binds a port to a host.
    bound = client.run("openstack", "port", "set", "--host", "h1", port["id"])
    assert bound.returncode != 0 and "403" in bound.stderr
    admin = Client(capsa, "admin", capsa.password("admin"), "admin")
    admin.ok("openstack", "port", "set", "--host", "h1", port["id"])
    assert client.openstack_json("port", "show", port["id"])["binding_host_id"] == "h1"

    # The group is in use by the port: deleting it is refused until the port goes.
    in_use = client.run("openstack", "security", "group", "delete", group["id"])
    assert in_use.returncode != 0
    for args in (
        ("port", "delete", port["id"]),
        ("security", "group", "delete", group["id"]),
        ("subnet", "delete", subnet["id"]),
        ("network", "delete", network["id"]),
    ):
        client.ok("openstack", *args)
    assert client.openstack_json("network", "list") == []
