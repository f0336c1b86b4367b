"""What the host data plane binds, and where the CNI daemon learns it.

A capsule's ports (one per network it joins) are allocated in the database before its sandbox
exists; when containerd runs ``capsa-cni``, the daemon looks them up through a
:class:`PortSource`, plugs them with :mod:`capsa.network.dataplane` and describes each result
with :class:`PluggedPort`. This module
imports nothing of capsa, so that the store can implement :class:`PortSource` without depending on
the CNI side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from typing import Protocol


@dataclass(frozen=True)
class PortBinding:
    """A port as the data plane needs it: where it goes (bridge) and what the pod end gets."""

    port_id: str
    network_id: str
    mac: str
    # The pod's address with the subnet's prefix length, e.g. 10.217.0.5/16.
    ip: IPv4Interface
    gateway: IPv4Address
    bridge: str
    mtu: int
    # The attachment that holds the port now, as the last ADD recorded it: the sandbox's CNI
    # container id and the host end of its veth. None when the port is not bound.
    bound_container_id: str | None = None
    bound_host_ifname: str | None = None

    @property
    def gateway_interface(self) -> IPv4Interface:
        """The gateway's address with the subnet's prefix: what the bridge carries."""
        return IPv4Interface(f"{self.gateway}/{self.ip.network.prefixlen}")


@dataclass(frozen=True)
class Link:
    name: str
    mac: str


@dataclass(frozen=True)
class PluggedPort:
    """What :meth:`Dataplane.plug` made: a veth from ``bridge`` into the pod's netns."""

    bridge: Link
    host_end: Link
    pod_end: Link
    # The netns path the pod end lives in (CNI_NETNS).
    netns: str
    address: IPv4Interface
    gateway: IPv4Address
    # Of both veth ends.
    mtu: int
    # The host end of an older attachment of the port that plugging this one removed.
    replaced: str | None = None


class PortSource(Protocol):
    """The ports the CNI daemon binds; implemented on the store.

    ``pod_name`` is the CRI sandbox's metadata name, which capsa sets to the capsule's uuid. The
    daemon calls them on the threads that serve its calls, never on an event loop: they block.
    """

    def find_ports(self, pod_name: str) -> list[PortBinding]:
        """The ports allocated for this pod, in its interface order (the first is the pod's
        first interface), with their current bindings; empty when it has none."""
        ...

    def bindings_of(self, port_ids: Sequence[str]) -> dict[str, tuple[str, str] | None]:
        """The current binding of each of these ports that exists (a capsule's): the container
        id and host end that hold it, or None."""
        ...

    def ports_bound(self, container_id: str, host_ifnames: dict[str, str]) -> None:
        """Records that the sandbox ``container_id`` now holds each port (by id) through its
        host end (``host_ifnames``: port id -> host end)."""
        ...

    def ports_unbound(self, port_ids: Sequence[str], container_id: str) -> None:
        """Forgets the ports' bindings, but only those that still belong to ``container_id``.

        A DEL for an old sandbox of the same capsule can arrive after the new sandbox was bound;
        it must not clear the new binding.
        """
        ...

    def pod_unbound(self, pod_name: str, container_id: str) -> list[str]:
        """Forgets the bindings that ``container_id`` holds on the pod's ports (not those of a
        newer sandbox, as :meth:`ports_unbound`), in one round trip; returns the ids of the
        ports it unbound (none when a DEL repeats)."""
        ...
