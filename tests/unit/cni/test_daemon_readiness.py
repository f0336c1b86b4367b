"""ADD of a capsule whose ports are still being allocated, or not yet enforced by the firewall.

The compute agent asks for a new capsule's sandbox while its ports are allocated, so the daemon,
when it runs beside the host's network agent, waits (bounded) for the ports and for a firewall
pass that enforces them before it plugs anything.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from tests.unit.cni.test_daemon import (
    PORT,
    WAIT_S,
    FakeDataplane,
    FakePorts,
    after_answers_done,
    call,
    envelope,
    page,
    serving,
)

from capsa.network.enforcement import EnforcedPorts, FirewallProgress
from capsa.network.types import PortBinding


class WatchedPorts(FakePorts):
    """Tells each time the daemon has read a pod's ports."""

    def __init__(self) -> None:
        super().__init__()
        self.ports = {}
        self.reads = 0
        self._read = threading.Event()

    def find_ports(self, pod_name: str) -> list[PortBinding]:
        found = super().find_ports(pod_name)
        self.reads += 1
        self._read.set()
        return found

    async def read_again(self) -> None:
        """Returns after the daemon's next read of the ports (on one of its threads)."""
        self._read.clear()
        assert await asyncio.to_thread(self._read.wait, WAIT_S), "the daemon read no ports"


@pytest.fixture
def ports() -> WatchedPorts:
    return WatchedPorts()


@pytest.fixture
def dataplane() -> FakeDataplane:
    return FakeDataplane()


@pytest.fixture
def progress() -> FirewallProgress:
    return FirewallProgress()


@pytest.fixture
async def client(
    ports: WatchedPorts, dataplane: FakeDataplane, progress: FirewallProgress
) -> AsyncIterator[aiohttp.ClientSession]:
    async with serving(ports, dataplane, progress=progress, ready_wait=30.0) as served:
        yield served.session


async def test_add_waits_for_the_ports_then_for_the_firewall_then_plugs(
    client: aiohttp.ClientSession,
    ports: WatchedPorts,
    dataplane: FakeDataplane,
    progress: FirewallProgress,
) -> None:
    add = asyncio.ensure_future(call(client, "add", envelope()))
    await ports.read_again()
    assert not add.done() and not dataplane.links

    # The ports are allocated: a firewall pass wakes the ADD, which finds them unenforced.
    ports.ports["pod-1"] = [PORT]
    progress.applied([])
    await ports.read_again()
    assert not add.done() and not dataplane.links

    progress.applied([PORT.port_id])
    async with asyncio.timeout(10):
        status, result = await add
    assert status == 200, result
    assert dataplane.plugged == {("c1", PORT.port_id): PORT.bridge}
    assert ports.bound[PORT.port_id][0] == "c1"


async def test_an_adds_wait_for_the_firewall_is_a_step_of_its_own(
    ports: WatchedPorts, dataplane: FakeDataplane, progress: FirewallProgress
) -> None:
    ports.ports["pod-1"] = [PORT]
    async with serving(ports, dataplane, progress=progress, ready_wait=30.0) as served:
        add = asyncio.ensure_future(call(served.session, "add", envelope()))
        await ports.read_again()
        await asyncio.sleep(0.05)
        progress.applied([PORT.port_id])
        async with asyncio.timeout(10):
            status, result = await add
        assert status == 200, result
        await after_answers_done(served)
        text = await page(served.session, "/metrics")

    count = 'capsa_cni_step_duration_seconds_count{command="ADD",step="wait"}'
    within_25_ms = 'capsa_cni_step_duration_seconds_bucket{command="ADD",step="wait",le="0.025"}'
    assert f"{count} 1" in text
    # It waited the 50 ms before the firewall enforced the port.
    assert f"{within_25_ms} 0" in text


async def test_a_sandbox_can_be_deleted_while_its_add_waits(
    client: aiohttp.ClientSession, ports: WatchedPorts, progress: FirewallProgress
) -> None:
    add = asyncio.ensure_future(call(client, "add", envelope()))
    await ports.read_again()

    # containerd gave up on the sandbox: its DEL does not wait for the ADD's wait.
    async with asyncio.timeout(10):
        status, _ = await call(client, "del", envelope())
    assert status == 200
    assert not add.done()

    ports.ports["pod-1"] = [PORT]
    progress.applied([PORT.port_id])
    async with asyncio.timeout(10):
        await add


async def test_an_add_whose_ports_never_come_fails_with_the_reason(
    ports: WatchedPorts, dataplane: FakeDataplane, progress: FirewallProgress
) -> None:
    async with serving(ports, dataplane, progress=progress, ready_wait=0.05) as served:
        status, error = await call(served.session, "add", envelope())
    assert status == 404 and error["code"] == 3
    assert "has no port" in error["msg"]
    assert not dataplane.links


async def test_an_add_whose_ports_the_firewall_does_not_enforce_is_not_plugged(
    ports: WatchedPorts, dataplane: FakeDataplane, progress: FirewallProgress
) -> None:
    ports.ports["pod-1"] = [PORT]
    progress.applied(["another-port"])
    async with serving(ports, dataplane, progress=progress, ready_wait=0.05) as served:
        status, error = await call(served.session, "add", envelope())
    assert status == 503 and error["code"] == 11
    assert "firewall does not enforce" in error["msg"]
    assert not dataplane.links and not ports.bound


async def test_an_add_of_enforced_ports_reads_them_once(
    client: aiohttp.ClientSession, ports: WatchedPorts, progress: FirewallProgress
) -> None:
    ports.ports["pod-1"] = [PORT]
    progress.applied([PORT.port_id])

    status, result = await call(client, "add", envelope())

    assert status == 200, result
    assert ports.calls == ["find_ports", "ports_bound"]


async def test_an_add_of_ports_not_yet_enforced_asks_the_network_agent_for_a_pass(
    client: aiohttp.ClientSession,
    ports: WatchedPorts,
    dataplane: FakeDataplane,
    progress: FirewallProgress,
) -> None:
    # The ports came from another process: the agent heard of nothing until asked.
    ports.ports["pod-1"] = [PORT]
    asked = asyncio.Event()
    progress.serve(asked.set)

    add = asyncio.ensure_future(call(client, "add", envelope()))
    async with asyncio.timeout(10):
        await asked.wait()
    assert not dataplane.links

    progress.applied([PORT.port_id])
    async with asyncio.timeout(10):
        status, result = await add
    assert status == 200, result


async def test_an_add_waiting_for_its_ports_gives_up_when_the_daemon_stops(
    ports: WatchedPorts, dataplane: FakeDataplane, progress: FirewallProgress
) -> None:
    async with serving(ports, dataplane, progress=progress, ready_wait=30.0) as served:
        add = asyncio.ensure_future(call(served.session, "add", envelope()))
        await ports.read_again()
        began = time.monotonic()

        await asyncio.wait_for(served.daemon.stop(), WAIT_S)
        status, error = await asyncio.wait_for(add, WAIT_S)

    # Not the 30 s of its wait: the stop did not wait for them either.
    assert time.monotonic() - began < WAIT_S
    assert status == 503 and error["code"] == 11, error
    assert "stopping" in error["msg"]
    assert not dataplane.links


async def test_an_add_beside_the_network_agent_takes_its_ports_from_the_firewalls_view(
    ports: WatchedPorts, dataplane: FakeDataplane, progress: FirewallProgress
) -> None:
    ports.ports["pod-1"] = [PORT]
    progress.applied([PORT.port_id], {"pod-1": [PORT]})
    async with serving(EnforcedPorts(progress, ports), dataplane, progress=progress) as served:
        status, result = await call(served.session, "add", envelope("c1"))
        assert status == 200, result
        # A new sandbox of the capsule before any pass read the first one's binding back: its
        # ADD still knows the port is bound, and takes it from the first sandbox.
        status, result = await call(served.session, "add", envelope("c2"))
        assert status == 200, result

    assert ports.calls == ["ports_bound", "ports_bound"]
    assert dataplane.plugged == {("c2", PORT.port_id): PORT.bridge}
    assert ports.bound[PORT.port_id][0] == "c2"
