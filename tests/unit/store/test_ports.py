from __future__ import annotations

import asyncio
import ipaddress

import pytest
from tests.unit.conftest import host_view, network_with_subnet

from capsa.model.network import (
    AllocationPool,
    Attachment,
    Direction,
    EtherType,
    HostNetworkView,
    LocalPort,
    Port,
    PortToBind,
    RemotePort,
)
from capsa.network.ipam import lowest_free_address, random_mac
from capsa.network.service import NetworkService
from capsa.store import Store, notify
from capsa.store.networks import NotFound
from capsa.store.ports import AddressInUse, InvalidAddress, SubnetFull


async def test_fifty_concurrent_allocations_get_distinct_addresses(store: Store) -> None:
    network = NetworkService(store, "10.1.0.0/24", 1500)
    ports = [
        port
        for allocated in await asyncio.gather(
            *(network.allocate_ports(f"capsule-{i}", "p1", "h1") for i in range(50))
        )
        for port in allocated
    ]
    addresses = {p.ip_address for p in ports}
    assert len(addresses) == 50
    assert len({p.mac_address for p in ports}) == 50
    subnet = (await network.project_defaults("p1")).subnet
    assert all(a in subnet.cidr and a != subnet.gateway_ip for a in addresses)


async def test_allocation_is_idempotent_per_device(store: Store) -> None:
    network = NetworkService(store, "10.1.0.0/24", 1500)
    [first] = await network.allocate_ports("capsule-a", "p1", "h1")
    [again] = await network.allocate_ports("capsule-a", "p1", "h1")
    assert first == again


async def test_released_addresses_return_to_the_pool(store: Store) -> None:
    network = NetworkService(store, "10.1.0.0/29", 1500)
    [first] = await network.allocate_ports("a", "p1", "h1")
    await network.release_ports("a")
    [again] = await network.allocate_ports("b", "p1", "h1")
    assert again.ip_address == first.ip_address


async def test_a_full_subnet_is_a_clear_error_and_leaves_nothing(store: Store) -> None:
    # /29: 6 hosts, one is the gateway.
    network = NetworkService(store, "10.1.0.0/29", 1500)
    for i in range(5):
        await network.allocate_ports(f"c{i}", "p1", "h1")
    with pytest.raises(SubnetFull, match=r"No more IP addresses available.*10\.1\.0\.0/29"):
        await network.allocate_ports("one-too-many", "p1", "h1")
    assert await store.ports.list_for_device("one-too-many") == []
    subnet = (await network.project_defaults("p1")).subnet
    assert len(await store.ports.list_for_subnet(subnet.id)) == 5


async def test_each_project_gets_its_own_default_network_and_group_once(store: Store) -> None:
    network = NetworkService(store, "10.2.0.0/23", 1400)
    first, second = await asyncio.gather(
        network.project_defaults("p1"), network.project_defaults("p1")
    )
    assert first == second
    assert first.network.is_default and first.network.mtu == 1400
    assert first.subnet.cidr == ipaddress.IPv4Network("10.2.0.0/24")
    assert first.subnet.gateway_ip == ipaddress.IPv4Address("10.2.0.1")
    other = await network.project_defaults("p2")
    assert other.network.id != first.network.id
    assert other.subnet.cidr == ipaddress.IPv4Network("10.2.1.0/24")
    assert other.network.segmentation_id != first.network.segmentation_id
    assert other.security_group.id != first.security_group.id
    group = first.security_group
    assert group.name == "default" and group.is_default
    rules = {(r.direction.value, r.ethertype.value, r.remote_group_id) for r in group.rules}
    assert rules == {
        ("egress", "IPv4", None),
        ("egress", "IPv6", None),
        ("ingress", "IPv4", group.id),
        ("ingress", "IPv6", group.id),
    }


async def test_a_capsule_port_is_in_the_projects_default_group(store: Store) -> None:
    network = NetworkService(store, "10.2.0.0/24", 1500)
    [port] = await network.allocate_ports("a", "p1", "h1")
    defaults = await network.project_defaults("p1")
    assert port.security_group_ids == (defaults.security_group.id,)
    assert port.network_id == defaults.network.id


async def test_a_capsule_can_name_its_network_and_groups(store: Store) -> None:
    service = NetworkService(store, "10.2.0.0/24", 1500)
    net = await store.networks.create_network(project_id="p1", name="back", mtu=1450)
    await store.networks.create_subnet(
        network_id=net.id,
        project_id="p1",
        cidr=ipaddress.IPv4Network("10.3.0.0/24"),
        gateway_ip=ipaddress.IPv4Address("10.3.0.1"),
        allocation_pools=[
            AllocationPool(ipaddress.IPv4Address("10.3.0.100"), ipaddress.IPv4Address("10.3.0.101"))
        ],
    )
    web = await store.networks.create_security_group(project_id="p1", name="web")
    [port] = await service.allocate_ports("a", "p1", "h1", Attachment(("back",), ("web",)))
    assert port.network_id == net.id
    assert port.ip_address == ipaddress.IPv4Address("10.3.0.100")
    assert port.security_group_ids == (web.id,)
    # The pool has two addresses.
    await service.allocate_ports("b", "p1", "h1", Attachment(("back",), ("web",)))
    with pytest.raises(SubnetFull):
        await service.allocate_ports("c", "p1", "h1", Attachment(("back",), ("web",)))
    # Another project cannot use p1's network (it is not shared) nor its groups.
    with pytest.raises(NotFound, match="network back"):
        await service.allocate_ports("d", "p2", "h1", Attachment(("back",)))
    with pytest.raises(NotFound, match="security group web"):
        await service.allocate_ports("d", "p2", "h1", Attachment((), ("web",)))
    assert await store.ports.list_for_device("d") == []


async def test_a_fixed_address_in_use_is_refused(store: Store) -> None:
    service = NetworkService(store, "10.2.0.0/24", 1500)
    [port] = await service.allocate_ports("a", "p1", "h1")

    async def create(ip: str) -> Port:
        return await store.ports.create(
            network_id=port.network_id,
            project_id="p1",
            device_id="",
            device_owner="",
            host=None,
            pick_address=lambda s, used: None,
            mac_address=lambda: f"fa:16:3e:00:00:{int(ip.rsplit('.', 1)[1]):02x}",
            ip_address=ipaddress.IPv4Address(ip),
        )

    with pytest.raises(AddressInUse, match=r"10\.2\.0\.2 is in use"):
        await create(str(port.ip_address))
    with pytest.raises(AddressInUse, match=r"10\.2\.0\.1 is in use"):
        await create("10.2.0.1")
    with pytest.raises(InvalidAddress):
        await create("10.9.0.9")
    assert (await create("10.2.0.77")).ip_address == ipaddress.IPv4Address("10.2.0.77")


async def test_a_binding_is_only_cleared_by_its_own_sandbox(store: Store) -> None:
    network = NetworkService(store, "10.1.0.0/24", 1500)
    [port] = await network.allocate_ports("a", "p1", "h1")
    await asyncio.to_thread(store.ports.set_bindings, "sandbox-new", {port.id: "capabc"})
    agents = store.hub.subscribe(notify.NETWORK)
    await asyncio.to_thread(store.ports.clear_bindings, [port.id], "sandbox-old")
    [bound] = await store.ports.list_for_device("a")
    assert bound.binding_container_id == "sandbox-new"
    # Nothing changed: the network agents are left alone.
    assert not await agents.wait(0)
    await asyncio.to_thread(store.ports.clear_bindings, [port.id], "sandbox-new")
    [unbound] = await store.ports.list_for_device("a")
    assert unbound.binding_container_id is None
    assert unbound.status == "DOWN"
    assert await agents.wait(0)


async def test_clear_device_bindings_forgets_only_that_sandboxs_and_says_which(
    store: Store,
) -> None:
    network = NetworkService(store, "10.3.0.0/24", 1400)
    [port] = await network.allocate_ports("a", "p1", "h1")
    [other] = await network.allocate_ports("b", "p1", "h1")
    await asyncio.to_thread(store.ports.set_bindings, "sandbox-new", {port.id: "capsaabc"})
    await asyncio.to_thread(store.ports.set_bindings, "sandbox-b", {other.id: "capsadef"})
    agents = store.hub.subscribe(notify.NETWORK)

    # A late DEL of the capsule's old sandbox, and a DEL naming another capsule.
    assert await asyncio.to_thread(store.ports.clear_device_bindings, "a", "sandbox-old") == []
    assert await asyncio.to_thread(store.ports.clear_device_bindings, "a", "sandbox-b") == []
    assert not await agents.wait(0)
    assert [p.binding_container_id for p in await store.ports.list_for_device("a")] == [
        "sandbox-new"
    ]

    assert await asyncio.to_thread(store.ports.clear_device_bindings, "a", "sandbox-new") == [
        port.id
    ]
    [unbound] = await store.ports.list_for_device("a")
    assert (unbound.binding_container_id, unbound.binding_host_ifname) == (None, None)
    assert unbound.status == "DOWN"
    assert await agents.wait(0)
    # Repeated: nothing left to forget, nobody woken.
    assert await asyncio.to_thread(store.ports.clear_device_bindings, "a", "sandbox-new") == []
    assert not await agents.wait(0)
    [still] = await store.ports.list_for_device("b")
    assert still.binding_container_id == "sandbox-b"


async def test_to_bind_reads_what_the_cni_daemon_binds_of_each_port(store: Store) -> None:
    network_service = NetworkService(store, "10.4.0.0/24", 1450)
    [port] = await network_service.allocate_ports("capsule-a", "p1", "h1")
    await asyncio.to_thread(store.ports.set_bindings, "sandbox-1", {port.id: "capsaabc"})
    defaults = await network_service.project_defaults("p1")

    [found] = await asyncio.to_thread(store.ports.to_bind, "capsule-a")

    assert found == PortToBind(
        id=port.id,
        network_id=defaults.network.id,
        mac_address=port.mac_address,
        ip_interface=ipaddress.IPv4Interface(f"{port.ip_address}/24"),
        gateway_ip=defaults.subnet.gateway_ip,
        mtu=1450,
        binding_container_id="sandbox-1",
        binding_host_ifname="capsaabc",
    )
    assert await asyncio.to_thread(store.ports.to_bind, "no-such-capsule") == []


async def test_a_port_that_only_names_a_capsule_is_never_bound_or_released_with_it(
    store: Store,
) -> None:
    service = NetworkService(store, "10.4.0.0/24", 1500)
    [own] = await service.allocate_ports("capsule-a", "p1", "h1")
    named = await store.ports.create(
        network_id=own.network_id,
        project_id="p2",
        device_id="capsule-a",
        device_owner="",
        host="h1",
        pick_address=lowest_free_address,
        mac_address=random_mac,
    )
    await asyncio.to_thread(
        store.ports.set_bindings, "sandbox-1", {own.id: "capsaown", named.id: "capsanamed"}
    )

    assert await asyncio.to_thread(store.ports.clear_device_bindings, "capsule-a", "sandbox-1") == [
        own.id
    ]
    await service.release_ports("capsule-a")

    assert await store.ports.list_for_device("capsule-a") == []
    left = await store.ports.get(named.id)
    assert (left.device_id, left.binding_container_id) == ("capsule-a", "sandbox-1")
    # Its own allocation is not the named port either.
    [again] = await service.allocate_ports("capsule-a", "p1", "h1")
    assert again.id != named.id and again.device_owner == "compute:capsule"


async def test_a_capsule_on_several_networks_gets_a_port_on_each_in_its_order(
    store: Store,
) -> None:
    service = NetworkService(store, "10.2.0.0/24", 1500)
    front = await network_with_subnet(store, "p1", "front", "10.5.0.0/24")
    back = await network_with_subnet(store, "p1", "back", "10.6.0.0/24")
    web = await store.networks.create_security_group(project_id="p1", name="web")

    ports = await service.allocate_ports("a", "p1", "h1", Attachment(("back", front), ("web",)))

    assert [(p.network_id, p.interface_index) for p in ports] == [(back, 0), (front, 1)]
    assert [str(p.ip_address) for p in ports] == ["10.6.0.2", "10.5.0.2"]
    # Security groups apply to each port.
    assert all(p.security_group_ids == (web.id,) for p in ports)
    assert await store.ports.list_for_device("a") == ports
    assert [p.network_id for p in await asyncio.to_thread(store.ports.to_bind, "a")] == [
        back,
        front,
    ]
    # Again: the same ports, none made.
    assert await service.allocate_ports("a", "p1", "h1", Attachment(("back", "front"))) == ports


async def test_a_capsule_whose_second_network_is_full_gets_no_port_at_all(store: Store) -> None:
    service = NetworkService(store, "10.2.0.0/24", 1500)
    await network_with_subnet(store, "p1", "front", "10.5.0.0/24")
    await network_with_subnet(store, "p1", "tiny", "10.7.0.0/24", ("10.7.0.10", "10.7.0.10"))
    await service.allocate_ports("a", "p1", "h1", Attachment(("tiny",)))

    with pytest.raises(SubnetFull, match=r"10\.7\.0\.0/24"):
        await service.allocate_ports("b", "p1", "h1", Attachment(("front", "tiny")))

    assert await store.ports.list_for_device("b") == []
    ports = await store.ports.list_ports("p1")
    assert [str(p.ip_address) for p in ports] == ["10.7.0.10"]


async def test_the_host_view_holds_what_the_hosts_firewall_and_overlay_need(store: Store) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 1000, ("runc",))
    await store.hosts.register("h2", "http://h2", 1000, 1000, ("runc",))
    await store.hosts.set_tunnel_ip("h2", "192.0.2.2")
    service = NetworkService(store, "10.2.0.0/24", 1500)
    front = await network_with_subnet(store, "p1", "front", "10.5.0.0/24", mtu=1450)
    back = await network_with_subnet(store, "p1", "back", "10.6.0.0/24")
    await network_with_subnet(store, "p1", "lonely", "10.7.0.0/24")
    web = await store.networks.create_security_group(project_id="p1", name="web")
    rule = await store.networks.create_rule(
        security_group_id=web.id,
        project_id="p1",
        direction=Direction.INGRESS,
        ethertype=EtherType.IPV4,
        remote_group_id=web.id,
    )
    a = await service.allocate_ports("a", "p1", "h1", Attachment(("front", "back"), ("web",)))
    [b] = await service.allocate_ports("b", "p1", "h1", Attachment(("front",), ("web",)))
    [remote] = await service.allocate_ports("c", "p1", "h2", Attachment(("back",), ("web",)))
    await service.allocate_ports("d", "p1", "h2", Attachment(("lonely",), ("web",)))

    view = await host_view(store, "h1")

    subnets = {s.network_id: s for s in await store.networks.list_subnets("p1")}
    # Only this host's ports (in the order of their creation, which one transaction may share).
    expected = [
        LocalPort(port, await store.networks.get_network(port.network_id), subnets[port.network_id])
        for port in [*a, b]
    ]
    assert {lp.port.id: lp for lp in view.ports} == {lp.port.id: lp for lp in expected}
    assert len(view.ports) == 3 and view.ports[-1].port == b
    assert {lp.network.id: lp.network.mtu for lp in view.ports} == {front: 1450, back: 1500}
    assert view.rules == {web.id: (*(await store.networks.get_security_group(web.id)).rules,)}
    assert rule in view.rules[web.id]
    # Every member of a remote group, wherever it is: the firewall keeps those of its networks.
    members = [(p.network_id, p.ip_address) for p in await store.ports.list_ports("p1")]
    assert len(members) == 5
    assert sorted(view.members[web.id]) == sorted(members)
    assert view.remote_ports == (RemotePort(back, "h2", "192.0.2.2", remote.mac_address),)


async def test_the_host_view_is_made_again_only_when_what_it_holds_changed(store: Store) -> None:
    service = NetworkService(store, "10.3.0.0/16", 1500)
    [port] = await service.allocate_ports("a", "p1", "h1")
    [group_id] = port.security_group_ids
    rows, view = await store.ports.host_view_if_changed("h1", None)
    assert view is not None and [lp.port for lp in view.ports] == [port]

    async def changed() -> HostNetworkView | None:
        """The view if it changed since the last read (which it then becomes), else None."""
        nonlocal rows
        rows, new_view = await store.ports.host_view_if_changed("h1", rows)
        return new_view

    # Nothing this host enforces: another project's port on another host, an unused group.
    await service.allocate_ports("x", "p2", "h2")
    await store.networks.create_security_group(project_id="p1", name="unused")
    assert await changed() is None

    rule = await store.networks.create_rule(
        security_group_id=group_id,
        project_id="p1",
        direction=Direction.INGRESS,
        ethertype=EtherType.IPV4,
        protocol="tcp",
        port_range_min=22,
    )
    view = await changed()
    assert view is not None and rule in view.rules[group_id]
    assert await changed() is None

    # A new member of the group that the default rules name as remote, on another host.
    [member] = await service.allocate_ports("b", "p1", "h2")
    view = await changed()
    assert view is not None
    assert (member.network_id, member.ip_address) in view.members[group_id]

    await asyncio.to_thread(store.ports.set_bindings, "sandbox-a", {port.id: "capsa0123456789"})
    view = await changed()
    assert view is not None and view.ports[0].port.binding_host_ifname == "capsa0123456789"
    assert await changed() is None

    await store.ports.update(port.id, admin_state_up=False)
    view = await changed()
    assert view is not None and not view.ports[0].port.admin_state_up

    await store.networks.update_network(port.network_id, admin_state_up=False)
    view = await changed()
    assert view is not None and not view.ports[0].network.admin_state_up

    await store.ports.delete(port.id)
    view = await changed()
    assert view is not None and view.ports == ()
    assert await changed() is None
