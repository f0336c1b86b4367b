"""Tenant networks on one host, end to end: a real `capsa up`, containerd, bridges and nftables.

Pods are probed from inside their own network namespace (``nsenter --net`` into the netns that
containerd made for the sandbox), as another pod of the same capsule would reach them.
"""

from __future__ import annotations

import ipaddress
import json
import random
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from tests.integration.conftest import CapsaInstance, bridges_for, free_pool

from capsa.network import firewall

pytestmark = pytest.mark.integration

NEUTRON = "/networking/v2.0"
# Two web servers: port 80 and port 81, each answering with the pod's hostname.
WEB_COMMAND = [
    "sh",
    "-c",
    "mkdir -p /www && echo hello from $HOSTNAME > /www/index.html && "
    "httpd -p 81 -h /www && exec httpd -f -p 80 -h /www",
]


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=check)


def web(name: str, host_port: int | None = None) -> dict[str, Any]:
    port: dict[str, Any] = {"containerPort": 80, "protocol": "TCP"}
    if host_port:
        port["hostPort"] = host_port
    container = {"name": "web", "image": "busybox", "command": WEB_COMMAND, "ports": [port]}
    return {"kind": "capsule", "metadata": {"name": name}, "spec": {"containers": [container]}}


def ip_of(capsule: dict[str, Any]) -> str:
    [address] = [a["addr"] for net in capsule["addresses"].values() for a in net]
    return str(address)


def netns_of(ip: str) -> str:
    """The netns (under /var/run/netns) whose interfaces hold ``ip``."""
    for name in sh("ip", "netns", "list").stdout.split():
        shown = sh("ip", "-n", name, "-j", "-4", "addr", "show", check=False)
        if shown.returncode == 0 and f'"{ip}"' in shown.stdout:
            return f"/var/run/netns/{name}"
    raise AssertionError(f"no netns holds {ip}")


def reaches(source_ip: str, target: str, port: int | None = None) -> bool:
    """Whether the pod with ``source_ip`` gets an answer from ``target`` (ICMP echo, or an HTTP
    page on ``port``)."""
    netns = f"--net={netns_of(source_ip)}"
    if port is None:
        probe = ["busybox", "ping", "-c", "1", "-W", "1", target]
    else:
        # busybox's own wget crashes on this host; any HTTP client does.
        fetch = (
            f"import urllib.request; urllib.request.urlopen('http://{target}:{port}/', timeout=2)"
        )
        probe = [sys.executable, "-I", "-c", fetch]
    return sh("nsenter", netns, *probe, check=False).returncode == 0


def eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Rules follow a change within a pass of the network agent: polls until ``check`` holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what}")
        time.sleep(0.3)


def never(check: Callable[[], bool], what: str, tries: int = 3) -> None:
    for _ in range(tries):
        assert not check(), what


# The headers of a member of a project: its token.
Headers = dict[str, str]


def neutron(
    capsa: CapsaInstance, method: str, path: str, project: Headers, body: Any = None
) -> Any:
    status, answer = capsa.request(method, NEUTRON + path, body, project)
    assert status < 300, (status, answer)
    return answer


def http_from_host(address: str, port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/", timeout=3) as response:
            return str(response.read().decode())
    except OSError:
        return None


def host_address() -> str:
    """A global address of this host, not loopback and not one of capsa's bridges."""
    for link in json.loads(sh("ip", "-j", "-4", "addr", "show").stdout):
        if link["ifname"] == "lo" or link["ifname"].startswith("cbr-"):
            continue
        for address in link.get("addr_info", []):
            if address.get("scope") == "global":
                return str(address["local"])
    pytest.skip("this host has no global IPv4 address for a hostPort to answer on")


def test_projects_are_isolated_rules_open_exactly_a_port_and_host_ports_come_and_go(
    new_capsa: Callable[..., CapsaInstance],
) -> None:
    pool = free_pool(23)
    capsa = new_capsa(CAPSA_NETWORK_DEFAULT_CIDR=pool, CAPSA_NETWORK_DEFAULT_PREFIXLEN="24")
    capsa.cidr = pool
    capsa.start()
    table = firewall.table_name(str(capsa.state_dir))
    suffix = uuid.uuid4().hex[:6]
    alice, bob = capsa.token_headers(f"alice-{suffix}"), capsa.token_headers(f"bob-{suffix}")
    host_port = random.randint(20000, 29999)

    capsa.create(web("a1", host_port), **alice)
    capsa.create(web("a2"), **alice)
    capsa.create(web("b1"), **bob)
    capsa.create(web("b2"), **bob)
    a1, a2, b1, b2 = (
        ip_of(wait_running(capsa, name, project))
        for name, project in (("a1", alice), ("a2", alice), ("b1", bob), ("b2", bob))
    )
    alice_net = ipaddress.ip_network(f"{a1}/24", strict=False)
    bob_net = ipaddress.ip_network(f"{b1}/24", strict=False)
    assert alice_net != bob_net and ipaddress.ip_address(a2) in alice_net
    assert ipaddress.ip_address(b2) in bob_net
    # Two networks, two bridges; the host routes between them.
    assert len(bridges_for(pool)) == 2
    assert sh("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"

    # Within a project (its default network and group): ICMP and TCP.
    eventually(lambda: reaches(a2, a1) and reaches(a2, a1, 80), "a2 reaches a1")
    eventually(lambda: reaches(b2, b1) and reaches(b2, b1, 80), "b2 reaches b1")
    # Across projects: nothing, either way.
    never(lambda: reaches(a2, b1) or reaches(a2, b1, 80), "a2 reached b1")
    never(lambda: reaches(b2, a1) or reaches(b2, a1, 80), "b2 reached a1")

    # A pod cannot pass for another address of its network: the bridge table holds every bound
    # port's MAC and address, and a packet from elsewhere goes nowhere.
    def bound_ports_guarded() -> bool:
        guarded = sh("nft", "list", "table", "bridge", table, check=False).stdout
        ports = neutron(capsa, "GET", "/ports", alice)["ports"]
        return all(
            f"ether saddr != {p['mac_address']}" in guarded
            and f"ip saddr != {p['fixed_ips'][0]['ip_address']}" in guarded
            for p in ports
        )

    eventually(bound_ports_guarded, "every bound port is guarded against spoofing")
    spoofed = str(alice_net.network_address + 250)
    netns = f"--net={netns_of(a2)}"
    sh("nsenter", netns, "ip", "addr", "add", f"{spoofed}/24", "dev", "eth0")
    ping = ("busybox", "ping", "-c", "1", "-W", "1", "-I", spoofed, a1)
    never(
        lambda: sh("nsenter", netns, *ping, check=False).returncode == 0,
        "a2 reached a1 from an address that is not its own",
    )
    sh("nsenter", netns, "ip", "addr", "del", f"{spoofed}/24", "dev", "eth0")
    # Nor the other network's gateway on the host.
    never(lambda: reaches(b2, str(alice_net.network_address + 1)), "b2 reached alice's gateway")

    # Alice opens TCP port 80 of her default group to Bob's network: exactly that.
    groups = neutron(capsa, "GET", "/security-groups?name=default", alice)["security_groups"]
    [group] = groups
    rule = {
        "security_group_id": group["id"],
        "direction": "ingress",
        "protocol": "tcp",
        "port_range_min": 80,
        "port_range_max": 80,
        "remote_ip_prefix": str(bob_net),
    }
    neutron(capsa, "POST", "/security-group-rules", alice, {"security_group_rule": rule})
    eventually(lambda: reaches(b2, a1, 80), "b2 reaches a1:80 once the rule exists")
    never(lambda: reaches(b2, a1, 81), "b2 reached a1:81, which no rule opens")
    never(lambda: reaches(b2, a1), "b2 pinged a1, which no rule allows")
    never(lambda: reaches(a2, b1, 80), "the rule opened Bob's pods too")

    # The hostPort answers on the host's address, and goes with the capsule.
    address = host_address()
    eventually(
        lambda: (http_from_host(address, host_port) or "").strip() == "hello from a1",
        "the hostPort answers",
    )
    for name, project in (("a1", alice), ("a2", alice), ("b1", bob), ("b2", bob)):
        status, body = capsa.request("DELETE", f"/v1/capsules/{name}", None, project)
        assert status == 204, body
    for name, project in (("a1", alice), ("a2", alice), ("b1", bob), ("b2", bob)):
        wait_gone(capsa, name, project)
    assert http_from_host(address, host_port) is None

    # Nothing is left: bridges, veths, capsa's table, addresses.
    eventually(lambda: table not in sh("nft", "list", "tables").stdout, "capsa's tables gone")
    # The CNI daemon deletes a veth after answering the DEL, its bridge once unused for a while.
    eventually(lambda: bridges_for(pool) == [], "the networks' bridges went with their ports")
    ports = (
        neutron(capsa, "GET", "/ports", alice)["ports"]
        + neutron(capsa, "GET", "/ports", bob)["ports"]
    )
    assert ports == []
    for ip in (a1, a2, b1, b2):
        with pytest.raises(AssertionError):
            netns_of(ip)


def test_a_capsule_on_two_networks_reaches_both_and_a_third_network_reaches_neither(
    new_capsa: Callable[..., CapsaInstance],
) -> None:
    capsa = new_capsa()
    capsa.start()
    alice = capsa.token_headers(f"alice-{uuid.uuid4().hex[:6]}")
    # Three networks of Alice's from the top of the instance's pool (its cleanup covers them).
    *_, cidr_a, cidr_b, cidr_c = ipaddress.ip_network(capsa.cidr).subnets(new_prefix=24)
    network_ids = {}
    for name, cidr in (("A", cidr_a), ("B", cidr_b), ("C", cidr_c)):
        network = neutron(capsa, "POST", "/networks", alice, {"network": {"name": name}})
        subnet = {"network_id": network["network"]["id"], "cidr": str(cidr), "ip_version": 4}
        neutron(capsa, "POST", "/subnets", alice, {"subnet": subnet})
        network_ids[name] = network["network"]["id"]

    def on(networks: str, name: str) -> dict[str, Any]:
        template = web(name)
        template["metadata"]["annotations"] = {"capsa.io/network": networks}
        return template

    capsa.create(on("A,B", "ab"), **alice)
    for name in ("a", "b", "c"):
        capsa.create(on(name.upper(), name), **alice)
    ab = wait_running(capsa, "ab", alice)
    a, b, c = (ip_of(wait_running(capsa, name, alice)) for name in ("a", "b", "c"))

    # An address on each network, in the order asked: eth0 on A (the default route), eth1 on B.
    assert list(ab["addresses"]) == [network_ids["A"], network_ids["B"]]
    ab_a, ab_b = (ab["addresses"][network_ids[n]][0]["addr"] for n in ("A", "B"))
    assert ipaddress.ip_address(ab_a) in cidr_a and ipaddress.ip_address(ab_b) in cidr_b
    pod = f"--net={netns_of(ab_a)}"
    addresses = json.loads(sh("nsenter", pod, "ip", "-j", "-4", "addr", "show").stdout)
    assert {(x["ifname"], i["local"]) for x in addresses for i in x["addr_info"]} >= {
        ("eth0", ab_a),
        ("eth1", ab_b),
    }
    default = json.loads(sh("nsenter", pod, "ip", "-j", "route", "show", "default").stdout)
    assert [(r["dev"], r["gateway"]) for r in default] == [("eth0", str(cidr_a[1]))]

    # The capsule reaches a pod on A and a pod on B, and they reach it, ICMP and TCP.
    eventually(lambda: reaches(ab_a, a) and reaches(ab_a, a, 80), "ab reaches a on A")
    eventually(lambda: reaches(ab_b, b) and reaches(ab_b, b, 80), "ab reaches b on B")
    eventually(lambda: reaches(a, ab_a) and reaches(a, ab_a, 80), "a reaches ab on A")
    eventually(lambda: reaches(b, ab_b) and reaches(b, ab_b, 80), "b reaches ab on B")
    # A pod on C reaches neither of its addresses, nor the pods of A and B; the networks stay
    # apart (B's pod does not reach the capsule's A address either).
    for target in (ab_a, ab_b, a, b):
        never(lambda t=target: reaches(c, t) or reaches(c, t, 80), f"c reached {target}")
    never(lambda: reaches(b, ab_a) or reaches(b, a), "b reached network A")

    for name in ("ab", "a", "b", "c"):
        status, body = capsa.request("DELETE", f"/v1/capsules/{name}", None, alice)
        assert status == 204, body
    for name in ("ab", "a", "b", "c"):
        wait_gone(capsa, name, alice)
    assert neutron(capsa, "GET", "/ports", alice)["ports"] == []
    eventually(lambda: bridges_for(capsa.cidr) == [], "the networks' bridges went with their ports")


def wait_running(
    capsa: CapsaInstance, name: str, project: Headers, timeout: float = 90
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    capsule = None
    while time.monotonic() < deadline:
        status, capsule = capsa.request("GET", f"/v1/capsules/{name}", None, project)
        if status == 200 and capsule["status"] == "Running":
            return dict(capsule)
        assert status == 200 and capsule["status"] != "Error", capsule
        time.sleep(0.3)
    raise AssertionError(f"{name} not running: {capsule}\n{capsa.log_tail()}")


def wait_gone(capsa: CapsaInstance, name: str, project: Headers, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _ = capsa.request("GET", f"/v1/capsules/{name}", None, project)
        if status == 404:
            return
        time.sleep(0.3)
    raise AssertionError(f"{name} still exists\n{capsa.log_tail()}")
