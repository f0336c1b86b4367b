"""What the data plane decides without the kernel; tests/integration/test_cni.py runs the rest."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface

from capsa.network.dataplane import HOST_IFNAME_PREFIX, host_ifname
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
