"""capsa's rtnetlink client on the real kernel: every request the data plane makes, in two network
namespaces of the test's own (a "host" and a "pod"), checked through iproute2 where the kernel's
own view matters. Deleting the namespaces at the end removes whatever a test made in them."""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

import pytest

from capsa.network import netlink
from capsa.network.netlink import NetlinkError, Rtnetlink

pytestmark = pytest.mark.integration


def ip_json(netns: str, *args: str) -> list[dict[str, Any]]:
    run = subprocess.run(
        ["ip", "-j", "-n", netns, *args], capture_output=True, text=True, timeout=30, check=True
    )
    result: list[dict[str, Any]] = json.loads(run.stdout or "[]")
    return result


@dataclass
class Netns:
    name: str
    fd: int
    nl: Rtnetlink


@pytest.fixture
def make_netns() -> Iterator[Any]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    made: list[Netns] = []

    def make() -> Netns:
        name = f"capsa-nl-{secrets.token_hex(5)}"
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        made.append(Netns(name, fd, netlink.open_in_netns(fd)))
        return made[-1]

    try:
        yield make
    finally:
        for netns in made:
            netns.nl.close()
            os.close(netns.fd)
            subprocess.run(["ip", "netns", "del", netns.name], check=False, timeout=30)


@pytest.fixture
def host(make_netns: Any) -> Netns:
    result: Netns = make_netns()
    return result


@pytest.fixture
def pod(make_netns: Any) -> Netns:
    result: Netns = make_netns()
    return result


def add_veth(nl: Rtnetlink, name: str, **settings: Any) -> list[netlink.Link | None]:
    """A veth made by the request the data plane sends; what the kernel echoed of it."""
    return nl.send_together([netlink.veth_request(name, **settings)])


def errno_of(call: Any) -> int | None:
    try:
        call()
    except NetlinkError as exc:
        return exc.errno
    return None


def test_the_socket_lives_in_its_netns(host: Netns) -> None:
    # A fresh netns holds lo only, down.
    (lo,) = host.nl.links()
    assert (lo.index, lo.ifname, lo.up) == (1, "lo", False)
    assert host.nl.get_link(index=1) == lo
    assert host.nl.get_link(name="lo") == lo


def thread_netns() -> int:
    return Path("/proc/thread-self/ns/net").stat().st_ino


def test_opening_a_socket_in_a_netns_leaves_the_thread_in_its_own(make_netns: Any) -> None:
    process_netns = Path("/proc/self/ns/net").stat().st_ino
    assert thread_netns() == process_netns
    pod = make_netns()
    assert thread_netns() == process_netns
    assert [link.ifname for link in pod.nl.links()] == ["lo"]
    # What this thread opens next is the host's again, not the pod's.
    with Rtnetlink() as here:
        assert any(link.ifname != "lo" for link in here.links())


def test_a_thread_that_cannot_come_back_opens_no_socket_again(
    make_netns: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pod = make_netns()
    real_setns = netlink._setns
    entered: list[int] = []

    def setns_that_cannot_return(fd: int) -> None:
        if entered:
            raise OSError(errno.EPERM, "Operation not permitted")
        real_setns(fd)
        entered.append(fd)

    monkeypatch.setattr(netlink, "_setns", setns_that_cannot_return)
    outcome: dict[str, Any] = {}

    def stranded() -> None:
        # A thread of its own: it really stays in the pod's netns, and ends with the test.
        with pytest.raises(RuntimeError, match="cannot return to its netns"):
            netlink.open_in_netns(pod.fd)
        outcome["netns"] = thread_netns()
        for attempt in (Rtnetlink, lambda: netlink.open_in_netns(pod.fd)):
            try:
                attempt()
            except RuntimeError as exc:
                outcome.setdefault("refused", []).append(str(exc))

    worker = threading.Thread(target=stranded)
    worker.start()
    worker.join(timeout=30)

    assert outcome["netns"] == os.fstat(pod.fd).st_ino
    assert len(outcome["refused"]) == 2
    assert all("stuck in another netns" in message for message in outcome["refused"])


def test_a_missing_link_is_enodev(host: Netns) -> None:
    assert errno_of(lambda: host.nl.get_link(name="nothing")) == errno.ENODEV
    assert errno_of(lambda: host.nl.get_link(index=4242)) == errno.ENODEV
    assert (
        errno_of(lambda: host.nl.send(netlink.link_request(name="nothing", up=True)))
        == errno.ENODEV
    )
    assert errno_of(lambda: host.nl.delete_link(name="nothing")) == errno.ENODEV
    assert errno_of(lambda: host.nl.delete_link(index=4242)) == errno.ENODEV


def test_bridge_is_made_once_with_its_mtu_and_address(host: Netns) -> None:
    host.nl.add_bridge("cbr-t", mtu=1400, address="02:00:00:00:0a:01")
    assert errno_of(lambda: host.nl.add_bridge("cbr-t", mtu=1400)) == errno.EEXIST
    bridge = host.nl.get_link(name="cbr-t")
    assert (bridge.kind, bridge.mtu, bridge.address, bridge.up) == (
        "bridge",
        1400,
        "02:00:00:00:0a:01",
        False,
    )
    (seen,) = ip_json(host.name, "-d", "link", "show", "dev", "cbr-t")
    assert seen["linkinfo"]["info_kind"] == "bridge"
    assert seen["address"] == "02:00:00:00:0a:01"


def test_link_settings_change_and_read_back(host: Netns) -> None:
    host.nl.add_bridge("cbr-t", mtu=1500)
    bridge = host.nl.get_link(name="cbr-t")
    alias = "capsa-cni " + "x" * (netlink.IFALIAS_MAX - len("capsa-cni "))
    host.nl.send(
        netlink.link_request(
            index=bridge.index, up=True, mtu=1300, address="02:00:00:00:0b:01", alias=alias
        )
    )
    changed = host.nl.get_link(index=bridge.index)
    assert (changed.up, changed.mtu, changed.address, changed.ifalias) == (
        True,
        1300,
        "02:00:00:00:0b:01",
        alias,
    )
    (seen,) = ip_json(host.name, "link", "show", "dev", "cbr-t")
    assert seen["ifalias"] == alias
    assert "UP" in seen["flags"]
    host.nl.send(netlink.link_request(name="cbr-t", up=False, alias=""))
    changed = host.nl.get_link(index=bridge.index)
    assert (changed.up, changed.ifalias) == (False, None)


def test_veth_peer_is_made_in_the_other_netns(host: Netns, pod: Netns) -> None:
    host.nl.add_bridge("cbr-t", mtu=1400)
    bridge = host.nl.get_link(name="cbr-t")
    (echoed,) = add_veth(
        host.nl,
        "capsa-t0",
        peer="eth0",
        peer_netns_fd=pod.fd,
        peer_address="02:00:00:00:0c:02",
        peer_mtu=1400,
        address="02:00:00:00:0c:01",
        mtu=1400,
        master=bridge.index,
        up=True,
    )
    host_end = host.nl.get_link(name="capsa-t0")
    pod_end = pod.nl.get_link(name="eth0")
    assert (host_end.kind, host_end.master, host_end.up, host_end.mtu, host_end.address) == (
        "veth",
        bridge.index,
        True,
        1400,
        "02:00:00:00:0c:01",
    )
    assert (pod_end.kind, pod_end.up, pod_end.mtu, pod_end.address) == (
        "veth",
        False,
        1400,
        "02:00:00:00:0c:02",
    )
    # Each end names the other's index, in the other's netns.
    assert (host_end.link, pod_end.link) == (pod_end.index, host_end.index)
    # This kernel echoes the new link (see netlink.veth_request): its peer's index comes with it.
    assert echoed is not None and echoed.link == pod_end.index
    assert [link.ifname for link in host.nl.links(master=bridge.index)] == ["capsa-t0"]
    assert [link["ifname"] for link in ip_json(host.name, "link", "show", "master", "cbr-t")] == [
        "capsa-t0"
    ]
    assert not any(link.ifname == "eth0" for link in host.nl.links())

    assert (
        errno_of(lambda: add_veth(host.nl, "capsa-t0", peer="eth1", peer_netns_fd=pod.fd))
        == errno.EEXIST
    )
    # Off the bridge and down, then gone with its peer.
    host.nl.send(netlink.link_request(index=host_end.index, master=0, up=False))
    detached = host.nl.get_link(index=host_end.index)
    assert (detached.master, detached.up) == (None, False)
    assert host.nl.links(master=bridge.index) == []
    host.nl.delete_link(name="capsa-t0")
    assert errno_of(lambda: pod.nl.get_link(name="eth0")) == errno.ENODEV


def test_a_locked_bridge_port_floods_nothing_and_forgets_its_macs_until_unlocked(
    host: Netns, pod: Netns
) -> None:
    host.nl.add_bridge("cbr-t", mtu=1500)
    bridge = host.nl.get_link(name="cbr-t")
    add_veth(host.nl, "capsa-t2", peer="eth0", peer_netns_fd=pod.fd, master=bridge.index, up=True)
    port = host.nl.get_link(name="capsa-t2")
    host.nl.send(netlink.link_request(index=bridge.index, up=True))
    pod_end = pod.nl.get_link(name="eth0")
    pod.nl.send(netlink.address_request(pod_end.index, IPv4Interface("10.77.0.2/24")))
    pod.nl.send(netlink.link_request(index=pod_end.index, up=True))
    # The pod's ARP request for a neighbour that is not there: the bridge learns its MAC.
    ping = ("ip", "netns", "exec", pod.name, "busybox", "ping", "-c1", "-W1", "10.77.0.9")
    subprocess.run(ping, capture_output=True, check=False, timeout=30)
    learnt = pod_end.address
    bridge_cmd = ("bridge", "-n", host.name)

    def settings() -> dict[str, Any]:
        (link,) = ip_json(host.name, "-d", "link", "show", "dev", "capsa-t2")
        data: dict[str, Any] = link["linkinfo"]["info_slave_data"]
        return {key: data[key] for key in ("locked", "flood", "mcast_flood", "bcast_flood")}

    def macs() -> list[str]:
        run = subprocess.run([*bridge_cmd, "-j", "fdb", "show", "dev", "capsa-t2"],
                             capture_output=True, text=True, check=True, timeout=30)  # fmt: skip
        return [entry["mac"] for entry in json.loads(run.stdout or "[]")]

    assert not port.port_locked and learnt in macs()

    host.nl.send(netlink.bridge_port_request(port.index, locked=True))

    locked = host.nl.get_link(index=port.index)
    assert locked.port_locked and (locked.up, locked.master) == (True, bridge.index)
    off = {"locked": True, "flood": False, "mcast_flood": False, "bcast_flood": False}
    assert settings() == off
    assert learnt not in macs()

    host.nl.send(netlink.bridge_port_request(port.index, locked=False))

    assert not host.nl.get_link(index=port.index).port_locked
    assert settings() == {"locked": False, "flood": True, "mcast_flood": True, "bcast_flood": True}


def test_veth_into_a_netns_that_already_has_the_name_is_eexist(host: Netns, pod: Netns) -> None:
    add_veth(host.nl, "capsa-t1", peer="eth0", peer_netns_fd=pod.fd)
    assert (
        errno_of(lambda: add_veth(host.nl, "capsa-t2", peer="eth0", peer_netns_fd=pod.fd))
        == errno.EEXIST
    )
    assert errno_of(lambda: host.nl.get_link(name="capsa-t2")) == errno.ENODEV


def test_addresses_are_added_once_and_dumped_per_link(host: Netns) -> None:
    host.nl.add_bridge("cbr-a", mtu=1500)
    host.nl.add_bridge("cbr-b", mtu=1500)
    a = host.nl.get_link(name="cbr-a")
    b = host.nl.get_link(name="cbr-b")
    host.nl.send(netlink.address_request(a.index, IPv4Interface("10.71.0.1/24")))
    host.nl.send(netlink.address_request(b.index, IPv4Interface("10.72.0.1/16")))
    assert (
        errno_of(
            lambda: host.nl.send(netlink.address_request(a.index, IPv4Interface("10.71.0.1/24")))
        )
        == errno.EEXIST
    )
    assert host.nl.addresses(a.index) == [
        netlink.Address(index=a.index, family=socket.AF_INET, address="10.71.0.1", prefixlen=24)
    ]
    assert [(x.address, x.prefixlen) for x in host.nl.addresses(b.index)] == [("10.72.0.1", 16)]
    assert host.nl.addresses(a.index, socket.AF_INET6) == []
    (seen,) = ip_json(host.name, "-4", "addr", "show", "dev", "cbr-a")
    assert [(x["local"], x["prefixlen"]) for x in seen["addr_info"]] == [("10.71.0.1", 24)]


def test_default_route_is_replaced_and_dumped(host: Netns) -> None:
    host.nl.add_bridge("cbr-r", mtu=1500)
    bridge = host.nl.get_link(name="cbr-r")
    host.nl.send(netlink.address_request(bridge.index, IPv4Interface("10.73.0.2/24")))
    host.nl.send(netlink.link_request(index=bridge.index, up=True))
    host.nl.send(netlink.default_route_request(IPv4Address("10.73.0.1"), bridge.index))
    host.nl.send(netlink.default_route_request(IPv4Address("10.73.0.254"), bridge.index))
    (default,) = host.nl.routes(socket.AF_INET, dst_len=0)
    assert (default.gateway, default.oif, default.dst, default.table) == (
        "10.73.0.254",
        bridge.index,
        None,
        netlink.RT_TABLE_MAIN,
    )
    assert any(r.dst == "10.73.0.0" and r.dst_len == 24 for r in host.nl.routes(socket.AF_INET))
    (seen,) = ip_json(host.name, "route", "show", "default")
    assert (seen["gateway"], seen["dev"]) == ("10.73.0.254", "cbr-r")


def test_requests_sent_together_are_carried_out_in_order(host: Netns) -> None:
    host.nl.add_bridge("cbr-t", mtu=1500)
    bridge = host.nl.get_link(name="cbr-t")
    address = IPv4Interface("10.74.0.2/24")
    steps = [
        netlink.address_request(bridge.index, address).tolerating(errno.EEXIST),
        netlink.link_request(index=bridge.index, up=True),
        # Needs the address and the link up before it: the kernel keeps the order.
        netlink.default_route_request(IPv4Address("10.74.0.1"), bridge.index),
    ]
    host.nl.send_together(steps)
    # Again: the address is there, and tolerated; the rest is idempotent.
    host.nl.send_together(steps)
    assert [x.address for x in host.nl.addresses(bridge.index)] == ["10.74.0.2"]
    assert host.nl.get_link(index=bridge.index).up
    (default,) = host.nl.routes(socket.AF_INET, dst_len=0)
    assert (default.gateway, default.oif) == ("10.74.0.1", bridge.index)
    host.nl.send_together([])


def test_a_failure_among_requests_sent_together_is_raised_after_the_rest_ran(
    host: Netns,
) -> None:
    host.nl.add_bridge("cbr-f", mtu=1500)
    bridge = host.nl.get_link(name="cbr-f")
    host.nl.send(netlink.address_request(bridge.index, IPv4Interface("10.75.0.2/24")))
    with pytest.raises(NetlinkError) as raised:
        host.nl.send_together(
            [
                netlink.link_request(index=bridge.index, mtu=1400),
                # Not tolerated: the first failure, the one raised.
                netlink.address_request(bridge.index, IPv4Interface("10.75.0.2/24")),
                netlink.link_request(name="cbr-missing", up=True),
                netlink.link_request(index=bridge.index, alias="after the failures"),
            ]
        )
    assert raised.value.errno == errno.EEXIST
    link = host.nl.get_link(index=bridge.index)
    assert (link.mtu, link.ifalias) == (1400, "after the failures")
    # The socket is left in step: the next request gets its own answer.
    assert host.nl.get_link(name="cbr-f").index == bridge.index


def test_vxlan_device_and_its_forwarding_entries(host: Netns) -> None:
    host.nl.add_bridge("cbr-v", mtu=1450)
    bridge = host.nl.get_link(name="cbr-v")
    host.nl.add_vxlan("cvx-v", vni=4242, local="192.0.2.10", port=4789, mtu=1450)
    assert (
        errno_of(
            lambda: host.nl.add_vxlan("cvx-v", vni=4242, local="192.0.2.10", port=4789, mtu=1450)
        )
        == errno.EEXIST
    )
    device = host.nl.get_link(name="cvx-v")
    assert (device.kind, device.vxlan_id, device.mtu) == ("vxlan", 4242, 1450)
    (seen,) = ip_json(host.name, "-d", "link", "show", "dev", "cvx-v")
    data = seen["linkinfo"]["info_data"]
    assert (data["id"], data["local"], data["port"], data["learning"]) == (
        4242,
        "192.0.2.10",
        4789,
        False,
    )
    host.nl.send(netlink.link_request(index=device.index, master=bridge.index, up=True))

    host.nl.append_fdb(device.index, "00:00:00:00:00:00", "192.0.2.11")
    host.nl.append_fdb(device.index, "00:00:00:00:00:00", "192.0.2.12")
    host.nl.append_fdb(device.index, "02:00:00:00:0d:01", IPv4Address("192.0.2.12"))
    remote = {(e.lladdr, e.dst) for e in host.nl.fdb_entries(device.index) if e.dst}
    assert remote == {
        ("00:00:00:00:00:00", "192.0.2.11"),
        ("00:00:00:00:00:00", "192.0.2.12"),
        ("02:00:00:00:0d:01", "192.0.2.12"),
    }
    assert all(e.ifindex == device.index for e in host.nl.fdb_entries(device.index))
    # The bridge's own entries are not the device's.
    assert not any(e.dst for e in host.nl.fdb_entries(bridge.index))
    host.nl.delete_fdb(device.index, "02:00:00:00:0d:01", "192.0.2.12")
    assert (
        errno_of(lambda: host.nl.delete_fdb(device.index, "02:00:00:00:0d:01", "192.0.2.12"))
        == errno.ENOENT
    )
    shown = subprocess.run(
        ["bridge", "-n", host.name, "-j", "fdb", "show", "dev", "cvx-v"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert sorted((e["mac"], e["dst"]) for e in json.loads(shown.stdout) if "dst" in e) == [
        ("00:00:00:00:00:00", "192.0.2.11"),
        ("00:00:00:00:00:00", "192.0.2.12"),
    ]

    host.nl.delete_link(index=device.index)
    host.nl.delete_link(index=bridge.index)
    assert [link.ifname for link in host.nl.links()] == ["lo"]


def test_the_kernels_own_message_comes_with_the_errno(host: Netns) -> None:
    with pytest.raises(NetlinkError) as caught:
        host.nl.add_vxlan("cvx-big", vni=1 << 24, local="192.0.2.10", port=4789, mtu=1450)
    assert caught.value.errno == errno.ERANGE
    assert "VXLAN ID" in str(caught.value)
