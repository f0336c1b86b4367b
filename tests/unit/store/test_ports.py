from __future__ import annotations

import asyncio
import ipaddress

import pytest

from capsa.network.service import NetworkService
from capsa.store import Store
from capsa.store.ports import SubnetFull


async def test_fifty_concurrent_allocations_get_distinct_addresses(store: Store) -> None:
    network = NetworkService(store, "10.1.0.0/24", 1500, "admin")
    ports = await asyncio.gather(
        *(network.allocate_port(f"capsule-{i}", "p1", "h1") for i in range(50))
    )
    addresses = {p.ip_address for p in ports}
    assert len(addresses) == 50
    assert len({p.mac_address for p in ports}) == 50
    _, subnet = await network.default_network()
    assert all(a in subnet.cidr and a != subnet.gateway_ip for a in addresses)


async def test_allocation_is_idempotent_per_device(store: Store) -> None:
    network = NetworkService(store, "10.1.0.0/24", 1500, "admin")
    first = await network.allocate_port("capsule-a", "p1", "h1")
    again = await network.allocate_port("capsule-a", "p1", "h1")
    assert first == again


async def test_released_addresses_return_to_the_pool(store: Store) -> None:
    network = NetworkService(store, "10.1.0.0/29", 1500, "admin")
    first = await network.allocate_port("a", "p1", "h1")
    await network.release_ports("a")
    again = await network.allocate_port("b", "p1", "h1")
    assert again.ip_address == first.ip_address


async def test_a_full_subnet_is_a_clear_error_and_leaves_nothing(store: Store) -> None:
    # /29: 6 hosts, one is the gateway.
    network = NetworkService(store, "10.1.0.0/29", 1500, "admin")
    for i in range(5):
        await network.allocate_port(f"c{i}", "p1", "h1")
    with pytest.raises(SubnetFull, match=r"10\.1\.0\.0/29"):
        await network.allocate_port("one-too-many", "p1", "h1")
    assert await store.ports.find_by_device("one-too-many") is None
    _, subnet = await network.default_network()
    assert len(await store.ports.list_for_subnet(subnet.id)) == 5


async def test_default_network_is_created_once(store: Store) -> None:
    assert await store.ports.default_network() is None
    cidr = ipaddress.IPv4Network("10.2.0.0/24")
    first = await store.ports.ensure_default_network("admin", cidr, 1400)
    second = await store.ports.ensure_default_network("admin", cidr, 1400)
    assert first == second == await store.ports.default_network()
    network, subnet = first
    assert network.mtu == 1400
    assert subnet.gateway_ip == ipaddress.IPv4Address("10.2.0.1")


async def test_a_binding_is_only_cleared_by_its_own_sandbox(store: Store) -> None:
    network = NetworkService(store, "10.1.0.0/24", 1500, "admin")
    port = await network.allocate_port("a", "p1", "h1")
    await store.ports.set_binding(port.id, "sandbox-new", "capabc")
    await store.ports.clear_binding(port.id, "sandbox-old")
    bound = await store.ports.find_by_device("a")
    assert bound is not None and bound.binding_container_id == "sandbox-new"
    await store.ports.clear_binding(port.id, "sandbox-new")
    unbound = await store.ports.find_by_device("a")
    assert unbound is not None and unbound.binding_container_id is None
    assert unbound.status == "DOWN"


async def test_find_with_network_reads_the_port_its_network_and_subnet(store: Store) -> None:
    network_service = NetworkService(store, "10.4.0.0/24", 1450, "admin")
    port = await network_service.allocate_port("capsule-a", "p1", "h1")
    await store.ports.set_binding(port.id, "sandbox-1", "capsaabc")
    network, subnet = await network_service.default_network()

    found = await store.ports.find_with_network("capsule-a")

    bound = await store.ports.find_by_device("capsule-a")
    assert found == (bound, network, subnet)
    assert found is not None and found[0].binding_container_id == "sandbox-1"
    assert await store.ports.find_with_network("no-such-capsule") is None
