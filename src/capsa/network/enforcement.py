"""Which local ports the host's firewall enforces now: the network agent tells, the CNI daemon asks.

A port's security group rules and its network's isolation must be in the kernel before the port's
veth is on a bridge: until then, the bridge's catch-all rules would take the pod's traffic for
the overlay's and let it pass. The compute agent asks for a new capsule's sandbox while its ports
are being allocated, so the network agent's pass that enforces them can end after containerd has
already called the CNI plugin; the daemon's ADD then waits for that pass (bounded), instead of
relying on the allocation having come first. A waiting ADD also asks for a pass: the network
agent may not have heard of the ports (allocated by another process, which reaches this one's
agent only at its resync), or its last pass may have failed (it retries at the next wake-up).

The pass also tells the capsules' ports as it read them, and :class:`EnforcedPorts` gives an
ADD its ports from there rather than from the database: the ADD plugs the very ports (MAC,
address, network) that the firewall's rules were made for, and its path reads nothing from the
database (the lookup was a tenth of the daemon's time per ADD, more with PostgreSQL). The
bindings are the exception: the daemon writes them, and the pass that reads them back comes
after the call, so those written since the pass read its view are kept beside it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

from capsa.network.types import PortBinding, PortSource

# A binding as the daemon last wrote it: the sandbox's container id and its host end, or None
# once forgotten.
_Binding = tuple[str, str] | None


class FirewallProgress:
    """The ports enforced by the network agent's latest applied pass, the capsules' ports as it
    read them, and a way to wait for the next pass. In-process only: the CNI daemon and the
    network agent of a host share one. The agent updates it on the event loop; the daemon reads
    it and waits on its own threads."""

    def __init__(self) -> None:
        self._ports: frozenset[str] = frozenset()
        self._capsule_ports: Mapping[str, Sequence[PortBinding]] = {}
        self._capsule_port_by_id: dict[str, PortBinding] = {}
        # Bindings written since the applied view was read, by port id (see bindings_written).
        self._written: dict[str, _Binding] = {}
        self._passes = 0
        self._changed = threading.Condition()
        self._ask_for_pass: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def serve(self, ask_for_pass: Callable[[], None]) -> None:
        """The network agent, on its event loop, says how to wake it for a pass."""
        self._loop = asyncio.get_running_loop()
        self._ask_for_pass = ask_for_pass

    def want_pass(self) -> None:
        """Wakes the network agent for a pass (coalesced with one under way or due); from any
        thread."""
        if self._ask_for_pass is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._ask_for_pass)

    def applied(
        self,
        port_ids: Iterable[str],
        capsule_ports: Mapping[str, Sequence[PortBinding]] | None = None,
    ) -> None:
        """A pass brought the firewall to a view whose local ports are ``port_ids``; of those,
        ``capsule_ports`` are the capsules' (by capsule, each in its interface order)."""
        with self._changed:
            self._ports = frozenset(port_ids)
            self._capsule_ports = capsule_ports or {}
            self._capsule_port_by_id = {
                port.port_id: port for ports in self._capsule_ports.values() for port in ports
            }
            # A written binding is forgotten once a view shows it, or no longer has its port.
            self._written = {
                port_id: binding
                for port_id, binding in self._written.items()
                if port_id in self._capsule_port_by_id
                and _binding_of(self._capsule_port_by_id[port_id]) != binding
            }
            self._passes += 1
            self._changed.notify_all()

    @property
    def passes(self) -> int:
        """How many passes were applied: what :meth:`wait_for_pass` waits to see grow."""
        return self._passes

    def enforces(self, port_ids: Iterable[str]) -> bool:
        return self._ports.issuperset(port_ids)

    def wait_for_pass(self, seen: int, timeout: float) -> None:
        """Blocks until a pass after the ``seen``-th was applied, or ``timeout`` seconds passed.
        Never on the event loop: the pass it waits for is applied there."""
        with self._changed:
            self._changed.wait_for(lambda: self._passes != seen, timeout)

    def ports_of(self, capsule: str) -> list[PortBinding]:
        """The capsule's ports as the latest applied pass read them, with the bindings written
        since; empty when that pass read none."""
        with self._changed:
            ports = self._capsule_ports.get(capsule, ())
            return [_with_binding(port, self._written) for port in ports]

    def bindings_written(self, container_id: str, host_ifnames: Mapping[str, str]) -> None:
        """The daemon recorded that ``container_id`` holds these ports (by id) through these
        host ends: its next lookups see it before a pass reads it back."""
        with self._changed:
            for port_id, host_ifname in host_ifnames.items():
                self._written[port_id] = (container_id, host_ifname)

    def bindings_forgotten(self, port_ids: Iterable[str], *, held_by: str | None = None) -> None:
        """The daemon forgot the ports' bindings; with ``held_by``, only those that this sandbox
        held, as the store does (not one that a newer sandbox holds)."""
        with self._changed:
            for port_id in port_ids:
                if held_by is None or self._holder(port_id) == held_by:
                    self._written[port_id] = None

    def _holder(self, port_id: str) -> str | None:
        """The container id that holds the port, as far as this knows; the caller holds the
        lock."""
        if port_id in self._written:
            binding = self._written[port_id]
            return binding[0] if binding is not None else None
        port = self._capsule_port_by_id.get(port_id)
        return port.bound_container_id if port is not None else None


class EnforcedPorts:
    """The CNI daemon's :class:`PortSource` beside a network agent: a capsule's ports from the
    agent's latest applied pass (see :class:`FirewallProgress`), from ``store`` when that pass
    read none of them (not allocated yet, or not enforced yet: the daemon waits for the firewall
    then, as for any port it does not enforce). Writes go to ``store``, and once there to
    ``progress``."""

    def __init__(self, progress: FirewallProgress, store: PortSource) -> None:
        self._progress = progress
        self._store = store

    def find_ports(self, pod_name: str) -> list[PortBinding]:
        return self._progress.ports_of(pod_name) or self._store.find_ports(pod_name)

    def bindings_of(self, port_ids: Sequence[str]) -> dict[str, tuple[str, str] | None]:
        return self._store.bindings_of(port_ids)

    def ports_bound(self, container_id: str, host_ifnames: dict[str, str]) -> None:
        self._store.ports_bound(container_id, host_ifnames)
        self._progress.bindings_written(container_id, host_ifnames)

    def ports_unbound(self, port_ids: Sequence[str], container_id: str) -> None:
        self._store.ports_unbound(port_ids, container_id)
        self._progress.bindings_forgotten(port_ids, held_by=container_id)

    def pod_unbound(self, pod_name: str, container_id: str) -> list[str]:
        # The store unbound these because the sandbox held them.
        unbound = self._store.pod_unbound(pod_name, container_id)
        self._progress.bindings_forgotten(unbound)
        return unbound


def _binding_of(port: PortBinding) -> _Binding:
    if port.bound_container_id is None or port.bound_host_ifname is None:
        return None
    return port.bound_container_id, port.bound_host_ifname


def _with_binding(port: PortBinding, written: Mapping[str, _Binding]) -> PortBinding:
    """``port`` with the binding written since its view was read, if there is one."""
    if port.port_id not in written:
        return port
    binding = written[port.port_id]
    container_id, host_ifname = binding if binding is not None else (None, None)
    return dataclasses.replace(port, bound_container_id=container_id, bound_host_ifname=host_ifname)
