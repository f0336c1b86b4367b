"""What the data plane decides without the kernel; tests/integration/test_cni_conformance.py runs
the rest."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface

import pytest

from capsa.model.network import MAX_CAPSULE_NETWORKS
from capsa.network.dataplane import HOST_IFNAME_PREFIX, AttachmentTag, host_ifname, pod_ifnames
from capsa.network.types import PortBinding


def test_host_ifname_fits_and_is_stable() -> None:
    container_id = "a3f9c1d2e4b5a6978877665544332211ffeeddccbbaa00998877665544332211"
    name = host_ifname(container_id, "eth0")
    assert len(name) == 15
    assert name.startswith(HOST_IFNAME_PREFIX)
    assert name == host_ifname(container_id, "eth0")


def test_host_ifname_differs_per_attachment() -> None:
    # A DEL for an old sandbox of the same capsule must never name the new sandbox's veth.
    names = {host_ifname(f"sandbox-{i}", "eth0") for i in range(1000)}
    names |= {host_ifname("sandbox-0", "eth1")}
    assert len(names) == 1001


def test_gateway_interface_takes_the_port_prefix() -> None:
    port = PortBinding(
        port_id="p",
        network_id="n",
        mac="fa:16:3e:00:00:01",
        ip=IPv4Interface("10.217.3.4/16"),
        gateway=IPv4Address("10.217.0.1"),
        bridge="capsa0",
        mtu=1500,
    )
    assert port.gateway_interface == IPv4Interface("10.217.0.1/16")


def test_attachment_tag_round_trips_through_the_alias() -> None:
    tag = AttachmentTag(owner="0123456789abcdef", port_id="port-1", container_id="a" * 64)
    assert AttachmentTag.parse(tag.alias()) == tag


@pytest.mark.parametrize(
    "alias",
    [None, "", "uplink to the router", "capsa-cni owner port", "capsa-cni  port container"],
)
def test_foreign_aliases_are_no_tag(alias: str | None) -> None:
    assert AttachmentTag.parse(alias) is None


def test_alias_fits_the_kernel_limit() -> None:
    tag = AttachmentTag(owner="0123456789abcdef", port_id="p" * 36, container_id="c" * 300)
    assert len(tag.alias().encode()) == 255


@pytest.mark.parametrize(
    ("ifname", "count", "names"),
    [
        ("eth0", 1, ["eth0"]),
        ("eth0", 3, ["eth0", "eth1", "eth2"]),
        ("net", 3, ["net", "net1", "net2"]),
        ("eth9", 2, ["eth9", "eth10"]),
        # Past 15 bytes a name cannot exist: fewer names come back.
        ("abcdefghijklmn9", 2, ["abcdefghijklmn9"]),
    ],
)
def test_pod_interfaces_are_numbered_from_cni_ifname(
    ifname: str, count: int, names: list[str]
) -> None:
    assert pod_ifnames(ifname, count) == names


def test_pod_interfaces_reach_the_most_networks_a_capsule_joins() -> None:
    assert len(pod_ifnames("eth0")) == MAX_CAPSULE_NETWORKS
