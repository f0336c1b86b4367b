"""The capsules' ports that the firewall enforces, as the CNI daemon reads them for an ADD."""

from __future__ import annotations

import dataclasses

import pytest
from tests.unit.cni.test_daemon import PORT, SECOND_PORT, FakePorts

from capsa.network.enforcement import EnforcedPorts, FirewallProgress
from capsa.network.types import PortBinding


def bound(port: PortBinding, container_id: str | None, host_ifname: str | None) -> PortBinding:
    return dataclasses.replace(port, bound_container_id=container_id, bound_host_ifname=host_ifname)


def apply(progress: FirewallProgress, capsule_ports: dict[str, list[PortBinding]]) -> None:
    progress.applied([p.port_id for ports in capsule_ports.values() for p in ports], capsule_ports)


def test_a_capsules_ports_are_the_applied_views_with_the_bindings_written_since() -> None:
    progress = FirewallProgress()
    assert progress.ports_of("pod-1") == []
    apply(progress, {"pod-1": [PORT, SECOND_PORT]})
    assert progress.ports_of("pod-1") == [PORT, SECOND_PORT]

    progress.bindings_written("c1", {PORT.port_id: "h1"})
    assert progress.ports_of("pod-1") == [bound(PORT, "c1", "h1"), SECOND_PORT]
    # A view read before the write does not take it back.
    apply(progress, {"pod-1": [PORT, SECOND_PORT]})
    assert progress.ports_of("pod-1") == [bound(PORT, "c1", "h1"), SECOND_PORT]

    progress.bindings_written("c2", {PORT.port_id: "h2", SECOND_PORT.port_id: "h3"})
    assert progress.ports_of("pod-1") == [bound(PORT, "c2", "h2"), bound(SECOND_PORT, "c2", "h3")]


def test_a_written_binding_gives_way_to_the_first_view_that_shows_it() -> None:
    progress = FirewallProgress()
    apply(progress, {"pod-1": [PORT]})
    progress.bindings_written("c1", {PORT.port_id: "h1"})

    apply(progress, {"pod-1": [bound(PORT, "c1", "h1")]})
    # From then on the views tell (here a view as a store changed behind the daemon's back).
    apply(progress, {"pod-1": [bound(PORT, "c9", "h9")]})
    assert progress.ports_of("pod-1") == [bound(PORT, "c9", "h9")]


def test_a_written_binding_goes_with_its_port() -> None:
    progress = FirewallProgress()
    apply(progress, {"pod-1": [PORT]})
    progress.bindings_written("c1", {PORT.port_id: "h1"})

    apply(progress, {})
    assert progress.ports_of("pod-1") == []
    apply(progress, {"pod-1": [PORT]})
    assert progress.ports_of("pod-1") == [PORT]


def test_bindings_forgotten_for_a_sandbox_leave_a_newer_sandboxs() -> None:
    progress = FirewallProgress()
    apply(progress, {"pod-1": [bound(PORT, "c1", "h1"), bound(SECOND_PORT, "c2", "h2")]})

    progress.bindings_forgotten([PORT.port_id, SECOND_PORT.port_id], held_by="c1")
    assert progress.ports_of("pod-1") == [PORT, bound(SECOND_PORT, "c2", "h2")]

    progress.bindings_written("c3", {PORT.port_id: "h3"})
    progress.bindings_forgotten([PORT.port_id], held_by="c1")
    assert progress.ports_of("pod-1")[0] == bound(PORT, "c3", "h3")

    # Without a holder: what the store says it unbound.
    progress.bindings_forgotten([PORT.port_id, SECOND_PORT.port_id])
    assert progress.ports_of("pod-1") == [PORT, SECOND_PORT]


def test_enforced_ports_read_the_store_only_for_a_capsule_the_view_lacks() -> None:
    store = FakePorts()
    store.ports["pod-2"] = [SECOND_PORT]
    progress = FirewallProgress()
    apply(progress, {"pod-1": [PORT]})
    ports = EnforcedPorts(progress, store)

    assert ports.find_ports("pod-1") == [PORT]
    assert store.calls == []
    assert ports.find_ports("pod-2") == [SECOND_PORT]
    assert store.calls == ["find_ports"]


def test_enforced_ports_write_to_the_store_and_then_remember() -> None:
    store = FakePorts()
    progress = FirewallProgress()
    apply(progress, {"pod-1": [PORT, SECOND_PORT]})
    ports = EnforcedPorts(progress, store)

    ports.ports_bound("c1", {PORT.port_id: "h1", SECOND_PORT.port_id: "h2"})
    assert store.bound == {PORT.port_id: ("c1", "h1"), SECOND_PORT.port_id: ("c1", "h2")}
    assert ports.find_ports("pod-1") == [bound(PORT, "c1", "h1"), bound(SECOND_PORT, "c1", "h2")]

    ports.ports_unbound([PORT.port_id], "c0")
    ports.ports_unbound([SECOND_PORT.port_id], "c1")
    assert ports.find_ports("pod-1") == [bound(PORT, "c1", "h1"), SECOND_PORT]

    store.ports["pod-1"] = [PORT, SECOND_PORT]
    assert ports.pod_unbound("pod-1", "c1") == [PORT.port_id]
    assert ports.find_ports("pod-1") == [PORT, SECOND_PORT]
    assert "find_ports" not in store.calls


class RefusingPorts(FakePorts):
    def ports_bound(self, container_id: str, host_ifnames: dict[str, str]) -> None:
        raise OSError("disk I/O error")


def test_a_write_the_store_refused_is_not_remembered() -> None:
    store = RefusingPorts()
    progress = FirewallProgress()
    apply(progress, {"pod-1": [bound(PORT, "c0", "h0")]})
    ports = EnforcedPorts(progress, store)

    with pytest.raises(OSError):
        ports.ports_bound("c1", {PORT.port_id: "h1"})
    store.fail = OSError("disk I/O error")
    with pytest.raises(OSError):
        ports.pod_unbound("pod-1", "c0")

    assert progress.ports_of("pod-1") == [bound(PORT, "c0", "h0")]
