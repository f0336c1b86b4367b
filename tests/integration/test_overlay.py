"""Two "hosts" on one machine, one network across them over VXLAN.

Each host is a network namespace with its own `capsa up` (and so its own containerd, registry,
agent, network agent and CNI daemon) started through ``nsenter --net``; both share one database.
An underlay bridge in the root namespace links the hosts (and lets the test reach their APIs).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.integration.conftest import CapsaInstance, free_pool, free_port
from tests.integration.test_tenant_networks import (
    eventually,
    ip_of,
    never,
    reaches,
    sh,
    wait_gone,
    wait_running,
    web,
)

from capsa.store import Store

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Underlay:
    bridge: str
    netns: tuple[str, str]
    addresses: tuple[str, str]


@pytest.fixture
def underlay() -> Iterator[Underlay]:
    """Two netns on a bridge of the root netns: 10.U.V.2 and .3 (.1 is the root's)."""
    tag = secrets.token_hex(3)
    prefix = free_pool(23).rsplit(".", 1)[0]  # "10.U.V" of a free /23
    bridge = f"cul-{tag}"
    netns = (f"capsa-ha-{tag}", f"capsa-hb-{tag}")
    addresses = (f"{prefix}.2", f"{prefix}.3")
    try:
        sh("ip", "link", "add", bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{prefix}.1/24", "dev", bridge)
        sh("ip", "link", "set", bridge, "up")
        for index, (name, address) in enumerate(zip(netns, addresses, strict=True)):
            outside = f"cul-{tag}-{index}"
            sh("ip", "netns", "add", name)
            sh("ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", name)
            sh("ip", "link", "set", outside, "master", bridge, "up")
            sh("ip", "-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            sh("ip", "-n", name, "link", "set", "eth0", "up")
            sh("ip", "-n", name, "link", "set", "lo", "up")
        yield Underlay(bridge, netns, addresses)
    finally:
        for name in netns:
            sh("ip", "netns", "del", name, check=False)
        for index in range(2):
            sh("ip", "link", "del", f"cul-{tag}-{index}", check=False)
        sh("ip", "link", "del", bridge, check=False)


def in_netns(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return sh("nsenter", f"--net=/run/netns/{netns}", *args, check=False)


def links_in(netns: str, prefix: str) -> set[str]:
    shown = json.loads(in_netns(netns, "ip", "-j", "link", "show").stdout)
    return {link["ifname"] for link in shown if link["ifname"].startswith(prefix)}


def set_disabled(database_url: str, host: str, disabled: bool) -> None:
    async def run() -> None:
        store = Store(database_url)
        try:
            await store.hosts.set_disabled(host, disabled)
        finally:
            await store.close()

    asyncio.run(run())


@dataclass
class TwoHosts:
    database_url: str
    first: CapsaInstance
    second: CapsaInstance


@pytest.fixture
def two_hosts(
    underlay: Underlay, new_capsa: Callable[..., CapsaInstance]
) -> Iterator[Callable[..., TwoHosts]]:
    """Starts a `capsa up` in each netns of the underlay, on one database and one default pool
    (``environment`` adds to both); stops them and removes what they shared afterwards."""
    shared = Path(tempfile.mkdtemp(prefix="capsa-it-shared-", dir="/tmp"))
    database_url = f"sqlite:///{shared / 'capsa.db'}"
    pool = free_pool(23)
    hosts: list[CapsaInstance] = []

    def start(**environment: str) -> TwoHosts:
        for netns, address in zip(underlay.netns, underlay.addresses, strict=True):
            instance = new_capsa(
                CAPSA_DATABASE_URL=database_url,
                CAPSA_NETWORK_DEFAULT_CIDR=pool,
                CAPSA_NETWORK_DEFAULT_PREFIXLEN="24",
                CAPSA_NETWORK_TUNNEL_IP=address,
                # The overlay's 50 bytes of headers fit in the underlay's 1500.
                CAPSA_NETWORK_MTU="1450",
                CAPSA_API_LISTEN=f"{address}:{free_port()}",
                CAPSA_IMAGES_CACHE_DIR=str(shared / "images"),
                **environment,
            )
            instance.netns = f"/run/netns/{netns}"
            instance.api_url = f"http://{instance.env['CAPSA_API_LISTEN']}"
            instance.cidr = pool
            hosts.append(instance)
        first, second = hosts
        first.start()
        # One cloud on two hosts: the second shares the first's identity (token key,
        # passwords), as hosts sharing a database must, or its bootstrap would give the admin a
        # new password.
        shutil.copytree(first.state_dir / "identity", second.state_dir / "identity")
        second.start()
        return TwoHosts(database_url, first, second)

    try:
        yield start
    finally:
        for instance in hosts:
            instance.cleanup()
        sh("rm", "-rf", str(shared))


def test_a_network_spans_two_hosts_over_vxlan_and_others_stay_apart(
    underlay: Underlay, two_hosts: Callable[..., TwoHosts]
) -> None:
    hosts = two_hosts(CAPSA_AGENT_RESYNC_INTERVAL="1", CAPSA_SCHEDULER_RESYNC_INTERVAL="1")
    first, second, database_url = hosts.first, hosts.second, hosts.database_url
    alice = first.token_headers(f"alice-{secrets.token_hex(3)}")
    bob = first.token_headers(f"bob-{secrets.token_hex(3)}")

    # Alice's x1 on the first host; then x2 (Alice) and y (Bob) on the second.
    set_disabled(database_url, second.host_name, True)
    first.create(web("x1"), **alice)
    x1 = ip_of(wait_running(first, "x1", alice))
    set_disabled(database_url, second.host_name, False)
    set_disabled(database_url, first.host_name, True)
    first.create(web("x2"), **alice)
    first.create(web("y"), **bob)
    x2 = ip_of(wait_running(first, "x2", alice))
    y = ip_of(wait_running(first, "y", bob))
    placed = {c["name"]: c["host"] for c in first.capsules()}
    assert placed == {"x1": first.host_name, "x2": second.host_name, "y": second.host_name}

    # One network on two hosts: ICMP and TCP both ways, through the VXLAN devices.
    eventually(lambda: reaches(x1, x2) and reaches(x1, x2, 80), "x1 reaches x2")
    eventually(lambda: reaches(x2, x1) and reaches(x2, x1, 80), "x2 reaches x1")
    # A VXLAN device per network with a port on the host: Alice's on both, Bob's on one.
    first_overlays, second_overlays = (links_in(netns, "cvx-") for netns in underlay.netns)
    assert len(first_overlays) == 1 and len(second_overlays) == 2
    assert first_overlays < second_overlays
    # Bob's network does not: not to Alice's pod on its own host, nor on the other.
    never(lambda: reaches(y, x2) or reaches(y, x2, 80), "y reached x2 on its host")
    never(lambda: reaches(y, x1) or reaches(y, x1, 80), "y reached x1 over the overlay")

    for name, project in (("x1", alice), ("x2", alice), ("y", bob)):
        status, body = first.request("DELETE", f"/v1/capsules/{name}", None, project)
        assert status == 204, body
    for name, project in (("x1", alice), ("x2", alice), ("y", bob)):
        wait_gone(first, name, project)

    # Nothing left on either host: bridges, veths, VXLAN devices, capsa's tables; no port.
    for netns in underlay.netns:
        eventually(
            lambda netns=netns: in_netns(netns, "nft", "list", "tables").stdout == "",
            f"capsa's tables gone on {netns}",
        )
        # The CNI daemon deletes a veth after answering the DEL, its bridge once unused for a while.
        eventually(
            lambda netns=netns: (
                not (links_in(netns, "cbr-") | links_in(netns, "cvx-") | links_in(netns, "capsa"))
            ),
            f"no capsa bridge, VXLAN device or veth left on {netns}",
        )
    status, body = first.request("GET", "/networking/v2.0/ports")
    assert status == 200 and body["ports"] == [], body


def test_a_host_learns_of_another_hosts_new_pod_at_once_not_at_its_resync(
    two_hosts: Callable[..., TwoHosts],
) -> None:
    # Resyncs far longer than the test: only a wake-up from the other process explains that a
    # host acts. database.wakeups carries them through the shared database.
    hosts = two_hosts(
        CAPSA_DATABASE_WAKEUPS="database",
        CAPSA_AGENT_RESYNC_INTERVAL="3600",
        CAPSA_SCHEDULER_RESYNC_INTERVAL="3600",
    )
    first, second = hosts.first, hosts.second
    alice = first.token_headers(f"alice-{secrets.token_hex(3)}")

    # The second host's pod, placed there by the first host's scheduler: its agent is woken
    # across processes.
    set_disabled(hosts.database_url, first.host_name, True)
    first.create(web("early"), **alice)
    early = ip_of(wait_running(first, "early", alice))
    # A new pod on the first host, placed by the second host's scheduler (the API that takes it
    # wakes the scheduler of its own process).
    set_disabled(hosts.database_url, first.host_name, False)
    set_disabled(hosts.database_url, second.host_name, True)
    second.create(web("late"), **alice)
    late = ip_of(wait_running(second, "late", alice))
    placed = {c["name"]: c["host"] for c in first.capsules()}
    assert placed == {"early": second.host_name, "late": first.host_name}

    # The second host's network agent learns of the new port (its MAC for the overlay's
    # forwarding entries, the first host as a flood destination) from the wake-up.
    eventually(lambda: reaches(early, late) and reaches(early, late, 80), "early reaches late")
    eventually(lambda: reaches(late, early), "late reaches early")

    for name in ("early", "late"):
        status, body = first.request("DELETE", f"/v1/capsules/{name}", None, alice)
        assert status == 204, body
    for name in ("early", "late"):
        wait_gone(first, name, alice)
