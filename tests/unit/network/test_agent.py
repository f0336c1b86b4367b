from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import replace

import pytest
from tests.unit.conftest import host_view, network_with_subnet

from capsa.model.capsule import Capsule, PortSpec
from capsa.model.network import (
    Attachment,
    Direction,
    EtherType,
    HostNetworkView,
    HostPortMapping,
)
from capsa.network import agent as agent_module
from capsa.network import firewall
from capsa.network.agent import NetworkAgent
from capsa.network.dataplane import Dataplane
from capsa.network.enforcement import FirewallProgress
from capsa.network.service import NetworkService
from capsa.store import Store, notify

CapsuleFactory = Callable[..., Capsule]
_NOTHING = HostNetworkView(ports=(), rules={}, members={}, remote_ports=())


class Applied(list[str]):
    """The scripts the agent hands to nft, in order (nft itself needs root)."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Condition()

    async def apply(self, script: str) -> None:
        async with self.changed:
            self.append(script)
            self.changed.notify_all()

    async def count(self, expected: int) -> None:
        async with asyncio.timeout(10), self.changed:
            await self.changed.wait_for(lambda: len(self) >= expected)
        assert len(self) == expected, self


@pytest.fixture
def applied(monkeypatch: pytest.MonkeyPatch) -> Applied:
    recorder = Applied()
    monkeypatch.setattr(firewall, "apply", recorder.apply)
    monkeypatch.setattr(agent_module, "_filter_bridged_traffic", lambda: None)
    return recorder


async def test_the_agent_follows_ports_rules_and_host_ports(
    store: Store, make_capsule: CapsuleFactory, applied: Applied
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 1000, ("runc",))
    network = NetworkService(store, "10.50.0.0/24", 1500)
    agent = NetworkAgent(store, "h1", "capsa_t", Dataplane(), resync_interval=3600)
    await agent.start()
    try:
        no_tables = "".join(
            firewall.script(family, "capsa_t", {}, None) for family in ("inet", "bridge")
        )
        assert applied == [no_tables]

        capsule = make_capsule()
        web = replace(capsule.containers[0].spec, ports=(PortSpec(80, "TCP", 8080),))
        capsule.containers[0].spec = web
        capsule.spec = replace(capsule.spec, containers=(web,))
        await store.capsules.create(capsule)
        assert await store.hosts.claim(capsule.uuid, "h1", 100, 64)
        [port] = await network.allocate_ports(capsule.uuid, "p1", "h1")
        await applied.count(2)
        assert f"th dport 8080 dnat ip to {port.ip_address}:80" in applied[-1]
        assert "@members_" in applied[-1] and "th dport 22" not in applied[-1]

        # A rule change reaches the table; a pass that changes nothing does not call nft.
        [group_id] = port.security_group_ids
        await store.networks.create_rule(
            security_group_id=group_id,
            project_id="p1",
            direction=Direction.INGRESS,
            ethertype=EtherType.IPV4,
            protocol="tcp",
            port_range_min=22,
            port_range_max=22,
        )
        await applied.count(3)
        assert "meta l4proto 6 th dport 22 accept" in applied[-1]
        await agent.sync()
        assert len(applied) == 3

        # A binding changes only the bridge table (it had none: it is declared whole).
        await asyncio.to_thread(store.ports.set_bindings, "sandbox1", {port.id: "capsa0123456789"})
        await applied.count(4)
        assert applied[-1].startswith("table bridge capsa_t {}\ndelete table bridge capsa_t\n")
        assert '"capsa0123456789" : jump' in applied[-1] and "table inet" not in applied[-1]

        # The capsule's removal takes its port, its mapping and then both tables.
        assert await store.capsules.remove(capsule.uuid)
        await applied.count(5)
        assert applied[-1] == applied[0]
    finally:
        await agent.stop()


async def test_host_ports_lead_to_the_capsules_first_interface(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 1000, ("runc",))
    network = NetworkService(store, "10.50.0.0/24", 1500)
    back = await network_with_subnet(store, "p1", "back", "10.51.0.0/24")
    default = (await network.project_defaults("p1")).network
    capsule = make_capsule()
    web = replace(capsule.containers[0].spec, ports=(PortSpec(80, "TCP", 8080), PortSpec(81)))
    capsule.containers[0].spec = web
    capsule.spec = replace(capsule.spec, containers=(web,))
    await store.capsules.create(capsule)
    assert await store.hosts.claim(capsule.uuid, "h1", 100, 64)
    first, second = await network.allocate_ports(
        capsule.uuid, "p1", "h1", Attachment(("back", default.id))
    )

    view = await host_view(store, "h1")

    assert view.host_ports == (HostPortMapping(first.id, 8080, 80, "tcp"),)
    assert first.network_id == back and second.network_id == default.id
    tables = firewall.render(view, {back: "cbr-b", default.id: "cbr-d"})
    script = firewall.script("inet", "capsa_t", tables["inet"], None)
    assert f"th dport 8080 dnat ip to {first.ip_address}:80" in script
    assert str(second.ip_address) + ":80" not in script
    # A capsule being deleted publishes nothing any more.
    await store.capsules.request_delete(capsule.uuid)
    assert (await host_view(store, "h1")).host_ports == ()


async def test_refused_changes_are_followed_by_a_whole_replacement(
    store: Store, make_capsule: CapsuleFactory, applied: Applied, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 1000, ("runc",))
    network = NetworkService(store, "10.50.0.0/24", 1500)
    agent = NetworkAgent(store, "h1", "capsa_t", Dataplane(), resync_interval=3600)
    await agent.sync()
    capsule = make_capsule()
    await store.capsules.create(capsule)
    assert await store.hosts.claim(capsule.uuid, "h1", 100, 64)
    [port] = await network.allocate_ports(capsule.uuid, "p1", "h1")
    await agent.sync()
    assert len(applied) == 2

    # Someone deleted a chain of capsa's table: nft refuses to flush it.
    async def refusing_changes(script: str) -> None:
        if "flush chain" in script:
            raise firewall.FirewallError("nftables refused capsa's ruleset: No such file")
        await applied.apply(script)

    monkeypatch.setattr(firewall, "apply", refusing_changes)
    await store.ports.update(port.id, admin_state_up=False)
    await agent.sync()

    assert len(applied) == 3
    whole = applied[-1]
    assert whole.startswith("table inet capsa_t {}\ndelete table inet capsa_t\n")
    assert f". {port.ip_address} }} drop" in whole
    # The tables are known again: the next change is sent alone.
    monkeypatch.setattr(firewall, "apply", applied.apply)
    await store.ports.update(port.id, admin_state_up=True)
    await agent.sync()
    assert "flush chain inet capsa_t forward" in applied[-1]
    assert "delete table" not in applied[-1]


async def test_the_firewall_engine_is_freed_once_the_host_has_had_no_port_for_a_resync(
    store: Store, make_capsule: CapsuleFactory, applied: Applied, monkeypatch: pytest.MonkeyPatch
) -> None:
    freed: list[float] = []
    clock = [1000.0]
    # As libnftables' context: made by a script, freed (True) only when one was made since.
    context_made = [False]

    async def apply(script: str) -> None:
        context_made[0] = True
        await applied.apply(script)

    def release() -> bool:
        if not context_made[0]:
            return False
        context_made[0] = False
        freed.append(clock[0])
        return True

    monkeypatch.setattr(firewall, "apply", apply)
    monkeypatch.setattr(firewall, "release", release)
    monkeypatch.setattr(agent_module, "monotonic", lambda: clock[0])
    await store.hosts.register("h1", "http://h1", 1000, 1000, ("runc",))
    network = NetworkService(store, "10.50.0.0/24", 1500)
    agent = NetworkAgent(store, "h1", "capsa_t", Dataplane(), resync_interval=30)
    await agent.start()
    try:
        # No port since start: nothing to keep it for.
        assert freed == [1000.0]

        capsule = make_capsule()
        await store.capsules.create(capsule)
        assert await store.hosts.claim(capsule.uuid, "h1", 100, 64)
        await network.allocate_ports(capsule.uuid, "p1", "h1")
        await applied.count(2)
        assert freed == [1000.0]

        # The last port goes: capsules that come and go soon would need the engine again.
        clock[0] = 1010.0
        assert await store.capsules.remove(capsule.uuid)
        await applied.count(3)
        await agent.sync()
        assert freed == [1000.0]

        # A resync interval later with no port, it is freed.
        clock[0] = 1040.0
        await agent.sync()
        assert freed == [1000.0, 1040.0]
    finally:
        await agent.stop()


async def test_a_binding_written_on_a_daemon_thread_wakes_a_pass_that_sees_it(
    store: Store, make_capsule: CapsuleFactory, applied: Applied
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 1000, ("runc",))
    network = NetworkService(store, "10.50.0.0/24", 1500)
    capsule = make_capsule()
    await store.capsules.create(capsule)
    assert await store.hosts.claim(capsule.uuid, "h1", 100, 64)
    # Allocated before the agent listens: no wake-up of the allocation's writes is left over.
    [port] = await network.allocate_ports(capsule.uuid, "p1", "h1")
    agent = NetworkAgent(store, "h1", "capsa_t", Dataplane(), resync_interval=3600)
    # At each pass's start, whether the port was bound by then; each pass once it ended.
    bound_at_start: list[bool] = []
    ended = asyncio.Semaphore(0)
    sync = agent.sync

    async def watched_sync() -> None:
        bound_at_start.append((await store.ports.get(port.id)).binding_container_id is not None)
        await sync()
        ended.release()

    agent.sync = watched_sync  # type: ignore[method-assign]
    await agent.start()
    try:
        # The start's own pass, then the one its tunnel address's write wakes: none is left.
        async with asyncio.timeout(10):
            for _ in range(2):
                await ended.acquire()
        bound_at_start.clear()

        # A CNI ADD's binding, written on one of the daemon's threads (which block).
        await asyncio.to_thread(network.ports_bound, "sandbox-1", {port.id: "capsa0123456789"})
        async with asyncio.timeout(10):
            await ended.acquire()

        assert bound_at_start == [True], "no pass, or a pass woken before the commit"
    finally:
        await agent.stop()


async def test_the_ports_a_pass_enforced_are_told_and_not_before_nftables_took_them(
    store: Store, make_capsule: CapsuleFactory, applied: Applied, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 1000, ("runc",))
    network = NetworkService(store, "10.50.0.0/24", 1500)
    progress = FirewallProgress()
    agent = NetworkAgent(
        store, "h1", "capsa_t", Dataplane(), resync_interval=3600, progress=progress
    )
    await agent.sync()
    assert progress.passes == 1
    capsule = make_capsule()
    await store.capsules.create(capsule)
    assert await store.hosts.claim(capsule.uuid, "h1", 100, 64)
    [port] = await network.allocate_ports(capsule.uuid, "p1", "h1")

    async def refused(script: str) -> None:
        raise firewall.FirewallError("nftables refused capsa's ruleset: Operation not permitted")

    monkeypatch.setattr(firewall, "apply", refused)
    with pytest.raises(firewall.FirewallError):
        await agent.sync()
    assert not progress.enforces([port.id]) and progress.passes == 1

    assert progress.ports_of(capsule.uuid) == []

    monkeypatch.setattr(firewall, "apply", applied.apply)
    await agent.sync()
    assert progress.enforces([port.id]) and progress.passes == 2
    assert progress.ports_of(capsule.uuid) == await asyncio.to_thread(
        network.find_ports, capsule.uuid
    )


async def test_an_add_waiting_for_its_ports_wakes_the_agent_for_a_pass(
    store: Store, applied: Applied
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 1000, ("runc",))
    progress = FirewallProgress()
    agent = NetworkAgent(
        store, "h1", "capsa_t", Dataplane(), resync_interval=3600, progress=progress
    )
    await agent.start()
    try:
        passes = asyncio.Event()
        sync = agent.sync

        async def watched_sync() -> None:
            passes.set()
            await sync()

        agent.sync = watched_sync  # type: ignore[method-assign]
        progress.want_pass()
        async with asyncio.timeout(10):
            await passes.wait()
    finally:
        await agent.stop()


async def test_passes_share_streaming_wake_ups_and_the_first_after_a_quiet_spell_is_not_delayed(
    store: Store, applied: Applied
) -> None:
    agent = NetworkAgent(store, "h1", "capsa_t", Dataplane(), resync_interval=3600)
    await agent.start()
    pass_seconds = 0.2
    starts: list[float] = []
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def slow_sync() -> None:
        starts.append(loop.time())
        started.set()
        await asyncio.sleep(pass_seconds)

    agent.sync = slow_sync  # type: ignore[method-assign]
    try:
        # The pass that the start's tunnel address write wakes, then a quiet spell longer than
        # the spacing after it: a wake-up is then served at once.
        async with asyncio.timeout(10):
            await started.wait()
        await asyncio.sleep(pass_seconds * (1 + agent_module.PASS_SPACING) + 0.2)
        starts.clear()
        started.clear()
        woken = loop.time()
        store.hub.publish(notify.NETWORK)
        async with asyncio.timeout(10):
            await started.wait()
        assert starts[0] - woken < pass_seconds
        # A stream of wake-ups for 1.2 s: without the spacing, six passes back to back.
        streamed = loop.time()
        while loop.time() - streamed < 1.2:
            store.hub.publish(notify.NETWORK)
            await asyncio.sleep(0.02)
        assert 2 <= len(starts) <= 3, [round(t - woken, 2) for t in starts]
        assert starts[0] >= woken
        gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
        assert all(gap >= pass_seconds * (1 + agent_module.PASS_SPACING) * 0.9 for gap in gaps)
    finally:
        await agent.stop()
