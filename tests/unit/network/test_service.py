from __future__ import annotations

import ipaddress

from capsa.network.service import NetworkService, bridge_name
from capsa.store import Store


async def test_find_port_gives_the_daemon_what_to_bind_and_the_current_binding(
    store: Store,
) -> None:
    network = NetworkService(store, "10.3.0.0/24", 1400)
    port = await network.allocate_port("capsule-a", "p1", "h1")

    binding = await network.find_port("capsule-a")
    assert binding is not None
    assert binding.port_id == port.id and binding.mac == port.mac_address
    assert binding.ip == ipaddress.IPv4Interface(f"{port.ip_address}/24")
    assert binding.gateway == ipaddress.IPv4Address("10.3.0.1")
    assert binding.bridge == bridge_name(binding.network_id) and len(binding.bridge) <= 15
    assert binding.mtu == 1400
    assert binding.bound_container_id is None

    await network.port_bound(port.id, "sandbox-1", "capsaabc")
    bound = await network.find_port("capsule-a")
    assert bound is not None
    assert (bound.bound_container_id, bound.bound_host_ifname) == ("sandbox-1", "capsaabc")

    # A late unbind of another sandbox changes nothing; its own does.
    await network.port_unbound(port.id, "sandbox-0")
    still = await network.find_port("capsule-a")
    assert still is not None and still.bound_container_id == "sandbox-1"
    await network.port_unbound(port.id, "sandbox-1")
    unbound = await network.find_port("capsule-a")
    assert unbound is not None and unbound.bound_container_id is None

    assert await network.find_port("no-such-capsule") is None


def test_bridges_of_different_networks_differ() -> None:
    a = bridge_name("6f1c2d3e-0000-4000-8000-000000000001")
    b = bridge_name("7f1c2d3e-0000-4000-8000-000000000001")
    assert a != b and a.startswith("cbr-") and len(a) == 15
