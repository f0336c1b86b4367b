from __future__ import annotations

import asyncio
import ipaddress

from tests.unit.conftest import network_with_subnet

from capsa.model.network import Attachment
from capsa.network.ipam import lowest_free_address, random_mac
from capsa.network.service import NetworkService, bridge_name, capsule_port_bindings
from capsa.store import Store


async def test_find_ports_gives_the_daemon_what_to_bind_and_the_current_bindings(
    store: Store,
) -> None:
    network = NetworkService(store, "10.3.0.0/24", 1400)
    [port] = await network.allocate_ports("capsule-a", "p1", "h1")

    [binding] = await asyncio.to_thread(network.find_ports, "capsule-a")
    assert binding.port_id == port.id and binding.mac == port.mac_address
    assert binding.ip == ipaddress.IPv4Interface(f"{port.ip_address}/24")
    assert binding.gateway == ipaddress.IPv4Address("10.3.0.1")
    assert binding.bridge == bridge_name(binding.network_id) and len(binding.bridge) <= 15
    assert binding.mtu == 1400
    assert binding.bound_container_id is None

    assert await asyncio.to_thread(network.bindings_of, [port.id, "no-such-port"]) == {
        port.id: None
    }
    await asyncio.to_thread(network.ports_bound, "sandbox-1", {port.id: "capsaabc"})
    [bound] = await asyncio.to_thread(network.find_ports, "capsule-a")
    assert (bound.bound_container_id, bound.bound_host_ifname) == ("sandbox-1", "capsaabc")
    assert await asyncio.to_thread(network.bindings_of, [port.id]) == {
        port.id: ("sandbox-1", "capsaabc")
    }

    # A late unbind of another sandbox changes nothing; its own does.
    await asyncio.to_thread(network.ports_unbound, [port.id], "sandbox-0")
    [still] = await asyncio.to_thread(network.find_ports, "capsule-a")
    assert still.bound_container_id == "sandbox-1"
    await asyncio.to_thread(network.ports_unbound, [port.id], "sandbox-1")
    [unbound] = await asyncio.to_thread(network.find_ports, "capsule-a")
    assert unbound.bound_container_id is None

    assert await asyncio.to_thread(network.find_ports, "no-such-capsule") == []


async def test_find_ports_of_a_capsule_on_two_networks_follows_its_order(store: Store) -> None:
    service = NetworkService(store, "10.3.0.0/24", 1400)
    other = await network_with_subnet(store, "p1", "other", "10.8.0.0/24", mtu=1300)
    default = (await service.project_defaults("p1")).network
    ports = await service.allocate_ports("capsule-a", "p1", "h1", Attachment(("other", default.id)))

    bindings = await asyncio.to_thread(service.find_ports, "capsule-a")

    assert [b.port_id for b in bindings] == [p.id for p in ports]
    assert [(b.bridge, b.mtu, str(b.gateway)) for b in bindings] == [
        (bridge_name(other), 1300, "10.8.0.1"),
        (bridge_name(default.id), 1400, "10.3.0.1"),
    ]
    await asyncio.to_thread(
        service.ports_bound, "sandbox-1", {ports[0].id: "capsa0", ports[1].id: "capsa1"}
    )
    await asyncio.to_thread(service.ports_unbound, [p.id for p in ports], "sandbox-1")
    assert [
        b.bound_container_id for b in await asyncio.to_thread(service.find_ports, "capsule-a")
    ] == [None, None]

    await asyncio.to_thread(
        service.ports_bound, "sandbox-2", {ports[0].id: "capsa0", ports[1].id: "capsa1"}
    )
    assert await asyncio.to_thread(service.pod_unbound, "capsule-a", "sandbox-1") == []
    assert sorted(await asyncio.to_thread(service.pod_unbound, "capsule-a", "sandbox-2")) == sorted(
        p.id for p in ports
    )
    assert [
        b.bound_container_id for b in await asyncio.to_thread(service.find_ports, "capsule-a")
    ] == [None, None]


async def test_a_host_views_capsule_ports_are_what_find_ports_gives(store: Store) -> None:
    service = NetworkService(store, "10.3.0.0/24", 1400)
    other = await network_with_subnet(store, "p1", "other", "10.8.0.0/24", mtu=1300)
    default = (await service.project_defaults("p1")).network
    two = await service.allocate_ports("capsule-a", "p1", "h1", Attachment(("other", default.id)))
    await service.allocate_ports("capsule-b", "p1", "h1")
    # Not capsule-a's, though its device_id says so: made through the API.
    await store.ports.create(
        network_id=other,
        project_id="p1",
        device_id="capsule-a",
        device_owner="",
        host="h1",
        pick_address=lowest_free_address,
        mac_address=random_mac,
    )
    await service.allocate_ports("capsule-c", "p1", "h2")
    await asyncio.to_thread(service.ports_bound, "sandbox-1", {two[1].id: "capsa1"})

    api_made = [p for p in await store.ports.list_ports("p1") if not p.device_owner]
    assert await asyncio.to_thread(service.bindings_of, [p.id for p in api_made]) == {}

    _, view = await store.ports.host_view_if_changed("h1", None)
    assert view is not None
    by_capsule = capsule_port_bindings(view.ports[::-1])

    assert sorted(by_capsule) == ["capsule-a", "capsule-b"]
    for capsule, bindings in by_capsule.items():
        assert bindings == await asyncio.to_thread(service.find_ports, capsule)
    assert [b.bound_container_id for b in by_capsule["capsule-a"]] == [None, "sandbox-1"]


def test_bridges_of_different_networks_differ() -> None:
    a = bridge_name("6f1c2d3e-0000-4000-8000-000000000001")
    b = bridge_name("7f1c2d3e-0000-4000-8000-000000000001")
    assert a != b and a.startswith("cbr-") and len(a) == 15
