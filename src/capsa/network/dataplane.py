"""The kernel side of a capsule's ports: a Linux bridge per network and a veth per pod and network.

::

    dataplane = Dataplane()
    plugged = dataplane.plug(container_id, "/run/netns/cni-1234", [("eth0", port)], owner, keeper)
    ...
    for removed in dataplane.unplug(container_id, "eth0"):
        if removed.bridge:
            dataplane.remove_bridge_if_unused(removed.bridge)

A capsule on several networks has an interface in its pod per network: the first is named
``CNI_IFNAME`` and carries the default route via its gateway, the next ones take the same name
numbered on (:func:`pod_ifnames`: eth1, eth2...) and route only to their own subnets. Each pod end
of a veth is created directly in the pod's netns (``IFLA_NET_NS_FD`` on the peer), with its
port's MAC, address and MTU. The host end is named after the CNI container id and the pod end's
name (:func:`host_ifname`), so that a DEL for an old sandbox of a capsule can never unplug its
newer sandbox; it joins its network's bridge. Its alias tags it as capsa's (:class:`AttachmentTag`:
who made it, for which port and sandbox), so that a GC can find the attachments a runtime no
longer knows. What names a runtime's attachment (container id, CNI_IFNAME) finds all the
capsule's interfaces: they are numbered from it, with no gap.

``plug`` is idempotent for one (container id, ifname) and repairs what a killed ADD left: a veth of
that name whose pod end is unconfigured is configured, one whose pod end is elsewhere is replaced,
a bridge without its address gets it. A bridge that this process made or completed is remembered:
a new veth joins it in one round trip, which also keeps the bridge up and addressed; when that
fails (the bridge deleted behind capsa's back, a leftover veth in the way), plug goes step by step.

A bridge's alias names the daemon that keeps it (``keeper``, see
:func:`capsa.cni.protocol.bridge_keeper`), so that a daemon that starts again finds the bridges it
left unused (:meth:`Dataplane.idle_bridges`) and never touches another's.

Every method blocks on netlink (:mod:`capsa.network.netlink`): call them from worker threads,
never from an event loop's thread. Each call borrows a socket of the host's netns from a pool
(one per concurrent call, kept for the next) and opens one in the pod's netns when it needs it;
:meth:`Dataplane.close` closes the idle ones. Creating a bridge, attaching a veth to it and
removing it are serialised per bridge, so that a pod never joins a bridge being removed; nothing
else is locked here.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import secrets
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Interface

from capsa.log import get_logger
from capsa.model.network import MAX_CAPSULE_NETWORKS
from capsa.network import netlink
from capsa.network.netlink import NetlinkError, Rtnetlink
from capsa.network.types import Link, PluggedPort, PortBinding

log = get_logger(__name__)

HOST_IFNAME_PREFIX = "capsa"
# First word of the host end's alias: the veth is one of capsa's attachments.
ALIAS_MARK = "capsa-cni"
# First word of a bridge's alias; the second is its keeper.
BRIDGE_ALIAS_MARK = "capsa-bridge"
# Interface names: at most IFNAMSIZ - 1 bytes.
_IFNAME_MAX = 15


class DataplaneError(Exception):
    """A step of binding a port failed; the message names the step, the objects and the cause."""


class NetnsNotFound(DataplaneError):
    pass


class InterfaceExists(DataplaneError):
    pass


def pod_ifnames(ifname: str, count: int = MAX_CAPSULE_NETWORKS) -> list[str]:
    """The names of a pod's first ``count`` interfaces when its runtime names the first
    ``ifname``: eth0, eth1, eth2... (net, net1, net2...). Names past the kernel's 15 bytes are
    left out, so fewer than ``count`` may come back."""
    stem = ifname.rstrip("0123456789")
    first = int(ifname[len(stem) :] or 0)
    names = [ifname, *(f"{stem}{first + n}" for n in range(1, count))]
    return [name for name in names if len(name.encode()) <= _IFNAME_MAX]


def host_ifname(container_id: str, ifname: str) -> str:
    """The host end's name for the attachment (container id, ifname): 15 characters at most."""
    digest = hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()
    return HOST_IFNAME_PREFIX + digest[: 15 - len(HOST_IFNAME_PREFIX)]


@dataclass(frozen=True)
class AttachmentTag:
    """What the host end's alias says: who made the attachment, for which port and sandbox.

    ``owner`` tells apart the attachments of several capsa instances on one machine, so that a GC
    of one never touches another's.
    """

    owner: str
    port_id: str
    container_id: str

    def alias(self) -> str:
        # Words without spaces (a CNI container id has none); a container id too long for the
        # kernel's limit is cut, which only costs its binding's cleanup on GC.
        alias = f"{ALIAS_MARK} {self.owner} {self.port_id} {self.container_id}"
        return alias[: netlink.IFALIAS_MAX]

    @classmethod
    def parse(cls, alias: str | None) -> AttachmentTag | None:
        words = (alias or "").split(" ")
        if len(words) != 4 or words[0] != ALIAS_MARK or not all(words):
            return None
        return cls(owner=words[1], port_id=words[2], container_id=words[3])


@dataclass(frozen=True)
class Attachment:
    """A host end found on this host: its name, its bridge and its tag (None if it has none,
    which only a veth whose ADD was killed right after creating it lacks)."""

    host_ifname: str
    bridge: str | None
    tag: AttachmentTag | None


class Dataplane:
    def __init__(self) -> None:
        self._bridge_locks: dict[str, threading.Lock] = {}
        self._bridge_locks_guard = threading.Lock()
        self._host = netlink.SocketPool()
        # The bridges this process made or completed (:func:`_ensure_bridge`), by name, under
        # their locks: a pod joins one of them in one round trip (see _veth_on_ready_bridge).
        self._ready_bridges: dict[str, tuple[int, Link]] = {}

    def close(self) -> None:
        """Closes the netlink sockets kept for reuse (a later call opens new ones)."""
        self._host.close()

    def ensure_bridge(self, name: str, gateway: IPv4Interface, mtu: int, *, keeper: str) -> Link:
        """The bridge ``name``, created if missing, with ``gateway`` as an address, up, kept by
        ``keeper``."""
        with self._bridge_lock(name), self._host.client() as host:
            _, bridge = _ensure_bridge(host, name, gateway, mtu, keeper)
        return bridge

    def plug(
        self,
        container_id: str,
        netns: str,
        interfaces: Sequence[tuple[str, PortBinding]],
        owner: str,
        keeper: str,
    ) -> list[PluggedPort]:
        """Connects the netns at path ``netns`` to each port's bridge through a veth whose pod
        end is named as the port is paired (the first one gets the default route). The veths
        are tagged as ``owner``'s, a bridge made or found as ``keeper``'s.

        Fails with InterfaceExists when one of the names exists in the netns and is not this
        attachment's own pod end. Plugging the same attachment again completes and returns it.
        A port still bound to an older attachment (``bound_host_ifname``) has it removed once
        the new one is sure to be made (a failed check leaves it). Whatever this call made is
        removed again if a later step fails.
        """
        ends = [
            _PodEnd(container_id, netns, ifname, port, owner, keeper, index == 0)
            for index, (ifname, port) in enumerate(interfaces)
        ]
        with (
            _open_netns(netns) as netns_fd,
            _netlink_in_netns(netns_fd, netns) as pod,
            self._host.client() as host,
        ):
            plugged: list[PluggedPort] = []
            try:
                # A sandbox's first ADD (the common case) makes its veths at once, on bridges
                # made before; what is in its netns is looked at only when that fails. Not when
                # a port is bound elsewhere: the old attachment goes only after the checks.
                if not any(_replaces_another(end) for end in ends):
                    for end in ends:
                        made = self._plug_at_once(host, pod, netns_fd, end)
                        if made is None:
                            break
                        plugged.append(made)
                rest = ends[len(plugged) :]
                for end, (pod_end, host_end) in zip(
                    rest, _ends_found(pod, host, rest), strict=True
                ):
                    plugged.append(self._plug_one(host, pod, netns_fd, end, pod_end, host_end))
            except BaseException:
                for made in plugged:
                    _remove_half_made(host, made.host_end.name)
                raise
        return plugged

    def _plug_at_once(
        self, host: Rtnetlink, pod: Rtnetlink, netns_fd: int, end: _PodEnd
    ) -> PluggedPort | None:
        """A new attachment's interface on a bridge made before, without looking first for what
        is in the way; None when that did not work (nothing is left of it then)."""
        with self._bridge_lock(end.port.bridge):
            veth = self._veth_on_ready_bridge(host, netns_fd, end)
        if veth is None:
            return None
        return self._configured(host, pod, end, veth, None, None)

    def _plug_one(
        self,
        host: Rtnetlink,
        pod: Rtnetlink,
        netns_fd: int,
        end: _PodEnd,
        pod_end: netlink.Link | None,
        host_end: netlink.Link | None,
    ) -> PluggedPort:
        """Plugs one port step by step; what it made is removed again if one of its steps
        fails."""
        port = end.port
        replaced = None
        replaces = port.bound_host_ifname
        if replaces and _replaces_another(end) and _remove_host_end(host, replaces):
            replaced = replaces
        with self._bridge_lock(port.bridge):
            veth = self._veth_on_bridge(host, netns_fd, end, host_end)
        return self._configured(host, pod, end, veth, pod_end, replaced)

    def _configured(
        self,
        host: Rtnetlink,
        pod: Rtnetlink,
        end: _PodEnd,
        veth: _Veth,
        pod_end: netlink.Link | None,
        replaced: str | None,
    ) -> PluggedPort:
        """The veth's pod end configured (an earlier ADD's ``pod_end`` reset first); the veth is
        removed again if that fails."""
        port = end.port
        try:
            pod_index = veth.pod_index
            if pod_end is not None:
                _reset_pod_end(pod, pod_end, end.ifname, port)
                pod_index = pod_end.index
            _configure_pod_end(pod, end.ifname, port, end.default_route, pod_index)
        except BaseException:
            _remove_half_made(host, end.host_name)
            raise
        return PluggedPort(
            bridge=veth.bridge,
            host_end=Link(end.host_name, veth.host_mac),
            pod_end=Link(end.ifname, port.mac),
            netns=end.netns,
            address=port.ip,
            gateway=port.gateway,
            mtu=port.mtu,
            replaced=replaced,
        )

    def _veth_on_ready_bridge(self, host: Rtnetlink, netns_fd: int, end: _PodEnd) -> _Veth | None:
        """A new veth on a bridge that this process completed before, in one round trip: the
        bridge kept up, at its MTU and with its gateway address (what a first ADD repairs), the
        veth made on it with its pod end, and tagged. None when the bridge is not one of those,
        or when a step failed: the veth is then removed if the round trip made it, the bridge
        forgotten if its steps failed, and the step-by-step way finds out what is wrong (a
        bridge deleted behind capsa's back, a link of the veth's name in the way, ...). The
        caller holds the bridge's lock."""
        port = end.port
        ready = self._ready_bridges.get(port.bridge)
        if ready is None:
            return None
        bridge_index, bridge = ready
        host_mac = _random_local_mac()
        bridge_steps = [
            netlink.link_request(index=bridge_index, up=True, mtu=port.mtu),
            netlink.address_request(bridge_index, port.gateway_interface).tolerating(errno.EEXIST),
        ]
        veth_step = len(bridge_steps)
        steps = [
            *bridge_steps,
            _veth_request(end.host_name, host_mac, bridge_index, netns_fd, end.ifname, port),
            netlink.link_request(name=end.host_name, alias=end.tag().alias()),
        ]
        try:
            echoed = host.send_together(steps)
        except netlink.RequestFailed as exc:
            log.info(
                "could not plug at once on a known bridge: going step by step",
                bridge=port.bridge,
                veth=end.host_name,
                port=port.port_id,
                error=str(exc),
            )
            if min(exc.failures) < veth_step:
                del self._ready_bridges[port.bridge]
            if veth_step not in exc.failures:
                # The veth was made: the failure came after.
                _remove_half_made(host, end.host_name)
            return None
        made = echoed[veth_step]
        return _Veth(bridge, host_mac, made.link if made is not None else None)

    def _veth_on_bridge(
        self,
        host: Rtnetlink,
        netns_fd: int,
        end: _PodEnd,
        host_end: netlink.Link | None,
    ) -> _Veth:
        """The veth on its bridge, tagged, step by step: the bridge made or completed (then
        known ready to this process), the veth made on it, or an earlier ADD's veth of this
        attachment attached again. The caller holds the bridge's lock."""
        port = end.port
        bridge_index, bridge = _ensure_bridge(
            host, port.bridge, port.gateway_interface, port.mtu, end.keeper
        )
        self._ready_bridges[port.bridge] = (bridge_index, bridge)
        host_name = end.host_name
        alias = end.tag().alias()
        pod_index = None
        if host_end is None:
            host_mac = _random_local_mac()
            create_veth = functools.partial(
                _create_veth, host, host_name, host_mac, bridge_index, netns_fd, end.netns
            )
            try:
                pod_index = create_veth(end.ifname, port)
            except _HostEndExists:
                # Its pod end is not in this netns: the leftover of an ADD that was killed, or
                # of a netns that went. It is replaced.
                log.info(
                    "removing a leftover veth of an earlier ADD",
                    veth=host_name,
                    container=end.container_id,
                    port=port.port_id,
                )
                _delete_link(host, host_name)
                pod_index = create_veth(end.ifname, port)
            # Made on the bridge and up: it only lacks its tag.
            tag_and_attach = [netlink.link_request(name=host_name, alias=alias)]
        else:
            host_mac = host_end.address or ""
            # An earlier ADD's veth, which a DEL may have detached since.
            tag_and_attach = [
                netlink.link_request(
                    index=host_end.index, alias=alias, master=bridge_index, mtu=port.mtu, up=True
                ),
                netlink.bridge_port_request(host_end.index, locked=False),
            ]
        try:
            host.send_together(tag_and_attach)
        except NetlinkError as exc:
            _remove_half_made(host, host_name)
            raise DataplaneError(
                f"cannot tag and attach veth {host_name} to bridge {port.bridge}: {exc}"
            ) from exc
        return _Veth(bridge, host_mac, pod_index)

    def unplug(self, container_id: str, ifname: str) -> list[Attachment]:
        """Removes the veths of the attachment (container id, ifname), each of its interfaces;
        returns what it removed.

        Deleting a host end deletes its pod end with it, wherever its netns is, so unplug never
        needs the netns: it succeeds alike when the netns is gone, when the veths are gone, and
        for a container id it never saw.
        """
        with self._host.client() as host:
            return [
                removed
                for link in _attachment_links(host, container_id, ifname)
                if (removed := _remove_host_end(host, link.ifname)) is not None
            ]

    def detach(self, container_id: str, ifname: str) -> list[Attachment]:
        """Takes the veths of the attachment (container id, ifname) off the network: their
        bridge ports locked, so that nothing reaches the pod or leaves it any more
        (:func:`netlink.bridge_port_request`); a host end on no bridge is set down. Returns what
        they were.

        This is what a DEL waits for. Deleting a veth waits for the kernel far longer (15-20 ms
        on this kernel, for the network's grace periods), and the veths go anyway when their
        netns does, which the runtime deletes after the DEL: :meth:`remove_detached` follows
        later. Until then they stay on their bridges and up: taking a port off its bridge, or
        setting it down, waits for a grace period too (0.4-0.9 ms against 0.02 to lock it).
        """
        detached = []
        with self._host.client() as host:
            for link in _attachment_links(host, container_id, ifname):
                detached.append(_attachment(host, link))
                if link.master:
                    off = netlink.bridge_port_request(link.index, locked=True)
                else:
                    off = netlink.link_request(index=link.index, up=False)
                # Gone meanwhile is as good as off.
                host.send(off.tolerating(errno.ENODEV))
        return detached

    def remove_detached(self, host_names: Sequence[str]) -> list[str]:
        """Deletes those of the host ends ``host_names`` that are still detached, locked or down
        (an ADD of the same attachment since has unlocked them); returns the ones it deleted."""
        removed = []
        with self._host.client() as host:
            for name in host_names:
                link = _find_link(host, name)
                if link is not None and _is_host_end(link) and _is_detached(link):
                    _delete_link(host, name)
                    removed.append(name)
        return removed

    def remove_attachment(self, host_name: str) -> Attachment | None:
        """Removes the attachment whose host end is ``host_name``, if that is one of capsa's
        veths; returns what it removed."""
        with self._host.client() as host:
            return _remove_host_end(host, host_name)

    def attachments(self) -> list[Attachment]:
        """Every host end of capsa's on this host, of every owner."""
        with self._host.client() as host:
            links = [link for link in host.links() if _is_host_end(link)]
            return [_attachment(host, link) for link in links]

    def idle_bridges(self, keeper: str) -> list[str]:
        """The bridges kept by ``keeper`` that no pod is attached to (an overlay device may be)."""
        with self._host.client() as host:
            links = host.links()
        alias = _bridge_alias(keeper)
        bridges = {
            link.index: link.ifname
            for link in links
            if link.kind == "bridge" and link.ifalias == alias
        }
        attached: dict[int, list[str]] = {index: [] for index in bridges}
        for link in links:
            if link.master in attached:
                attached[link.master].append(link.ifname)
        return [name for index, name in bridges.items() if not _pods_on(name, attached[index])]

    def remove_bridge_if_unused(self, name: str) -> bool:
        """Deletes the bridge ``name`` if no pod is attached to it (with its overlay device, if
        it has one); True if it did."""
        with self._bridge_lock(name), self._host.client() as host:
            self._ready_bridges.pop(name, None)
            bridge = _find_link(host, name)
            if bridge is None or bridge.kind != "bridge":
                return False
            attached = [link.ifname for link in host.links(master=bridge.index)]
            if _pods_on(name, attached):
                return False
            if attached:
                _delete_link(host, overlay_name(name))
            _delete_link(host, name)
        log.info("bridge removed: its last port left", bridge=name)
        return True

    def sync_overlay(
        self, bridge: str, *, vni: int, local_ip: str, port: int, mtu: int, macs: dict[str, str]
    ) -> bool:
        """Gives the network of ``bridge`` its VXLAN device on the bridge, with forwarding
        entries exactly for ``macs`` (a remote port's MAC -> its host's tunnel address) and one
        flood entry per remote host (broadcasts such as ARP reach every host, no multicast).

        A bridge is the CNI daemon's to make: without it nothing is done (False). The device
        does not learn: every entry comes from the database.
        """
        name = overlay_name(bridge)
        with self._bridge_lock(bridge), self._host.client() as host:
            link = _find_link(host, bridge)
            if link is None:
                return False
            device = _find_link(host, name)
            if device is not None and (
                device.kind != "vxlan" or device.vxlan_id != vni or device.master != link.index
            ):
                _delete_link(host, name)
                device = None
            try:
                if device is None:
                    host.add_vxlan(name, vni=vni, local=local_ip, port=port, mtu=mtu)
                    log.info("overlay device created", device=name, bridge=bridge, vni=vni)
                index = _get_link(host, name).index
                host.send(netlink.link_request(index=index, master=link.index, up=True))
                _sync_fdb(host, index, macs)
            except (NetlinkError, _NoSuchLink) as exc:
                raise DataplaneError(f"cannot program overlay device {name}: {exc}") from exc
        return True

    def remove_overlay(self, bridge: str) -> None:
        """Deletes the VXLAN device of the network of ``bridge``, if it has one."""
        with self._bridge_lock(bridge), self._host.client() as host:
            if _find_link(host, overlay_name(bridge)) is not None:
                _delete_link(host, overlay_name(bridge))

    def check(
        self, container_id: str, netns: str, interfaces: Sequence[tuple[str, PortBinding]]
    ) -> None:
        """Raises DataplaneError naming what differs from what plug made for the ports."""
        problems: list[str] = []
        with (
            _open_netns(netns) as netns_fd,
            _netlink_in_netns(netns_fd, netns) as pod,
            self._host.client() as host,
        ):
            for index, (ifname, port) in enumerate(interfaces):
                host_name = host_ifname(container_id, ifname)
                host_end = _find_link(host, host_name)
                pod_end = _find_link(pod, ifname)
                if host_end is None:
                    problems.append(f"host end {host_name} is missing")
                else:
                    problems += _host_end_problems(host, host_end, port)
                if pod_end is None:
                    problems.append(f"{ifname} is missing in netns {netns}")
                else:
                    if host_end is not None and not _are_peers(host_end, pod_end):
                        problems.append(f"{ifname} is not the peer of host end {host_name}")
                    problems += _pod_end_problems(pod, pod_end, ifname, port, index == 0)
        if problems:
            raise DataplaneError("; ".join(problems))

    def _bridge_lock(self, name: str) -> threading.Lock:
        with self._bridge_locks_guard:
            return self._bridge_locks.setdefault(name, threading.Lock())


class _NoSuchLink(Exception):
    pass


@dataclass(frozen=True)
class _PodEnd:
    """One interface of a pod that plug makes: its name, its port, who tags it and keeps its
    bridge, and whether it carries the pod's default route."""

    container_id: str
    netns: str
    ifname: str
    port: PortBinding
    owner: str
    keeper: str
    default_route: bool

    @functools.cached_property
    def host_name(self) -> str:
        return host_ifname(self.container_id, self.ifname)

    def tag(self) -> AttachmentTag:
        return AttachmentTag(self.owner, self.port.port_id, self.container_id)


@dataclass(frozen=True)
class _Veth:
    """A veth that plug made or found on its bridge: the bridge, the host end's MAC, and the
    pod end's index when the kernel told it (else it is asked for)."""

    bridge: Link
    host_mac: str
    pod_index: int | None


def _replaces_another(end: _PodEnd) -> bool:
    """Whether the port is bound to another attachment, which plugging it removes."""
    bound = end.port.bound_host_ifname
    return bool(bound) and bound != end.host_name


def _ends_found(
    pod: Rtnetlink, host: Rtnetlink, ends: Sequence[_PodEnd]
) -> list[tuple[netlink.Link | None, netlink.Link | None]]:
    """The pod end and host end that each interface has already, if this attachment's own (a
    re-ADD, or an ADD killed before it configured it); InterfaceExists when another link has a
    pod end's name. Only a pod end already there can be this attachment's own: a host end
    alone shows up when creating."""
    found = []
    for end in ends:
        pod_end = _find_link(pod, end.ifname)
        host_end = _find_link(host, end.host_name) if pod_end is not None else None
        if pod_end is not None and not _are_peers(host_end, pod_end):
            raise InterfaceExists(f"interface {end.ifname} already exists in netns {end.netns}")
        found.append((pod_end, host_end))
    return found


def _attachment_links(host: Rtnetlink, container_id: str, ifname: str) -> list[netlink.Link]:
    """The host ends of the attachment (container id, ifname), one per interface of its pod:
    numbered from ``ifname`` with no gap, so the first name missing ends them."""
    links = []
    for name in pod_ifnames(ifname):
        link = _find_link(host, host_ifname(container_id, name))
        if link is None or not _is_host_end(link):
            break
        links.append(link)
    return links


# The MAC of a forwarding entry that floods broadcasts and unknown unicast to a remote host.
_FLOOD_MAC = "00:00:00:00:00:00"


def overlay_name(bridge: str) -> str:
    """The VXLAN device of the network whose bridge is ``bridge`` (cbr-X -> cvx-X)."""
    return "cvx-" + bridge.removeprefix("cbr-")


def _sync_fdb(host: Rtnetlink, index: int, macs: dict[str, str]) -> None:
    wanted = set(macs.items()) | {(_FLOOD_MAC, ip) for ip in set(macs.values())}
    current = {
        (entry.lladdr, entry.dst)
        for entry in host.fdb_entries(index)
        if entry.ifindex == index and entry.lladdr and entry.dst
    }
    for mac, dst in current - wanted:
        host.delete_fdb(index, mac, dst)
    for mac, dst in sorted(wanted - current):
        host.append_fdb(index, mac, dst)


def _get_link(nl: Rtnetlink, name: str | None = None, index: int | None = None) -> netlink.Link:
    try:
        return nl.get_link(name=name, index=index)
    except NetlinkError as exc:
        if exc.errno == errno.ENODEV:
            raise _NoSuchLink(name or index) from None
        raise


def _find_link(nl: Rtnetlink, name: str) -> netlink.Link | None:
    """The link ``name``, or None."""
    try:
        return _get_link(nl, name)
    except _NoSuchLink:
        return None


def _remove_host_end(host: Rtnetlink, host_name: str) -> Attachment | None:
    link = _find_link(host, host_name)
    if link is None or not _is_host_end(link):
        return None
    attachment = _attachment(host, link)
    _delete_link(host, host_name)
    return attachment


def _is_host_end(link: netlink.Link) -> bool:
    return link.ifname.startswith(HOST_IFNAME_PREFIX) and link.kind == "veth"


def _is_detached(host_end: netlink.Link) -> bool:
    """Whether a DEL took the host end off the network (:meth:`Dataplane.detach`)."""
    return host_end.port_locked or not host_end.up


def _are_peers(host_end: netlink.Link | None, pod_end: netlink.Link | None) -> bool:
    """Whether two veth ends, seen from their own netns, point at each other."""
    return (
        host_end is not None
        and pod_end is not None
        and pod_end.kind == "veth"
        and pod_end.link == host_end.index
        and host_end.link == pod_end.index
    )


def _bridge_of(host: Rtnetlink, link: netlink.Link) -> str | None:
    """The name of the bridge ``link`` is attached to, if any."""
    if not link.master:
        return None
    try:
        return _get_link(host, index=link.master).ifname
    except _NoSuchLink:
        return None


def _attachment(host: Rtnetlink, link: netlink.Link) -> Attachment:
    return Attachment(link.ifname, _bridge_of(host, link), AttachmentTag.parse(link.ifalias))


def _host_end_problems(host: Rtnetlink, host_end: netlink.Link, port: PortBinding) -> list[str]:
    name = host_end.ifname
    problems = []
    on = _bridge_of(host, host_end)
    if on != port.bridge:
        problems.append(f"host end {name} is on {on}, not {port.bridge}")
    if not host_end.up:
        problems.append(f"host end {name} is down")
    if host_end.port_locked:
        problems.append(f"host end {name} is locked on its bridge: a DEL took it off the network")
    bridge = _find_link(host, port.bridge)
    if bridge is not None and port.gateway_interface not in _addresses(host, bridge.index):
        problems.append(f"bridge {port.bridge} lacks the gateway address {port.gateway_interface}")
    return problems


def _pod_end_problems(
    pod: Rtnetlink, pod_end: netlink.Link, ifname: str, port: PortBinding, default_route: bool
) -> list[str]:
    problems = []
    if pod_end.address != port.mac:
        problems.append(f"{ifname} has MAC {pod_end.address}, not {port.mac}")
    if not pod_end.up:
        problems.append(f"{ifname} is down")
    if port.ip not in _addresses(pod, pod_end.index):
        problems.append(f"{ifname} lacks {port.ip}")
    if default_route and not any(
        r.oif == pod_end.index and r.gateway == str(port.gateway)
        for r in pod.routes(socket.AF_INET, dst_len=0)
    ):
        problems.append(f"{ifname} has no default route via {port.gateway}")
    return problems


def _addresses(nl: Rtnetlink, index: int) -> set[IPv4Interface]:
    return {
        IPv4Interface(f"{a.address}/{a.prefixlen}") for a in nl.addresses(index, socket.AF_INET)
    }


def _delete_link(nl: Rtnetlink, name: str) -> None:
    try:
        nl.delete_link(name=name)
    except NetlinkError as exc:
        if exc.errno != errno.ENODEV:
            raise


def _remove_half_made(host: Rtnetlink, name: str) -> None:
    # The caller raises the original failure; this one only needs to be known.
    try:
        _delete_link(host, name)
    except NetlinkError as exc:
        log.warning("cannot remove a half-made veth", veth=name, error=str(exc))


def _pods_on(bridge: str, attached: Sequence[str]) -> bool:
    """Whether the links ``attached`` to ``bridge`` include a pod's: anything but its overlay."""
    return any(name != overlay_name(bridge) for name in attached)


def _bridge_alias(keeper: str) -> str:
    return f"{BRIDGE_ALIAS_MARK} {keeper}"


def _ensure_bridge(
    host: Rtnetlink, name: str, gateway: IPv4Interface, mtu: int, keeper: str
) -> tuple[int, Link]:
    link = _find_link(host, name)
    if link is None:
        try:
            # An explicit MAC keeps the gateway's MAC stable: a bridge with a random one adopts
            # the lowest MAC of its ports, which changes as pods come and go.
            host.add_bridge(name, mtu=mtu, address=_random_local_mac())
            log.info("bridge created", bridge=name, gateway=str(gateway), mtu=mtu)
        except NetlinkError as exc:
            # Another process made it first.
            if exc.errno != errno.EEXIST:
                raise DataplaneError(f"cannot create bridge {name}: {exc}") from exc
        link = _get_link(host, name)
    if link.kind != "bridge":
        raise DataplaneError(
            f"interface {name} exists but is a {link.kind or 'non-bridge'} interface: "
            "the network's bridge name must be free for capsa"
        )
    # Also completes a bridge that a killed ADD left without its address.
    try:
        host.send(netlink.address_request(link.index, gateway).tolerating(errno.EEXIST))
    except NetlinkError as exc:
        raise DataplaneError(f"cannot give bridge {name} the address {gateway}: {exc}") from exc
    alias = _bridge_alias(keeper)
    # A new bridge is down, so its alias costs no request of its own; one made by an earlier
    # version, or kept by a daemon at another address, is adopted.
    if link.mtu != mtu or not link.up or link.ifalias != alias:
        host.send(netlink.link_request(index=link.index, mtu=mtu, up=True, alias=alias))
    return link.index, Link(name, link.address or "")


class _HostEndExists(Exception):
    pass


def _veth_request(
    host_name: str, host_mac: str, bridge_index: int, netns_fd: int, ifname: str, port: PortBinding
) -> netlink.Request:
    """The veth on the bridge, up, its peer in the pod's netns with the port's MAC."""
    return netlink.veth_request(
        host_name,
        address=host_mac,
        mtu=port.mtu,
        master=bridge_index,
        up=True,
        peer=ifname,
        peer_netns_fd=netns_fd,
        peer_address=port.mac,
        peer_mtu=port.mtu,
    )


def _create_veth(
    host: Rtnetlink,
    host_name: str,
    host_mac: str,
    bridge_index: int,
    netns_fd: int,
    netns: str,
    ifname: str,
    port: PortBinding,
) -> int | None:
    """Creates the veth on the bridge, up, its peer in the pod's netns; returns the peer's index
    if the kernel echoed it. Raises _HostEndExists if a link named ``host_name`` is in the way."""
    try:
        (made,) = host.send_together(
            [_veth_request(host_name, host_mac, bridge_index, netns_fd, ifname, port)]
        )
    except NetlinkError as exc:
        if exc.errno != errno.EEXIST:
            raise DataplaneError(
                f"cannot create veth {host_name} into netns {netns}: {exc}"
            ) from exc
        if _find_link(host, host_name) is not None:
            raise _HostEndExists(host_name) from exc
        # plug found no pod end a moment ago: a concurrent call made one.
        raise InterfaceExists(
            f"interface {ifname} appeared in netns {netns} while plugging: another ADD for this "
            "netns runs at the same time"
        ) from exc
    return made.link if made is not None else None


def _reset_pod_end(pod: Rtnetlink, pod_end: netlink.Link, ifname: str, port: PortBinding) -> None:
    """Gives a pod end that an earlier ADD made the port's MAC and MTU, if it lacks them."""
    if pod_end.address == port.mac and pod_end.mtu == port.mtu:
        return
    try:
        pod.send(netlink.link_request(index=pod_end.index, up=False))
        pod.send(netlink.link_request(index=pod_end.index, address=port.mac, mtu=port.mtu))
    except NetlinkError as exc:
        raise DataplaneError(f"cannot reset {ifname} in the pod's netns: {exc}") from exc


def _configure_pod_end(
    pod: Rtnetlink, ifname: str, port: PortBinding, default_route: bool, index: int | None
) -> None:
    """Gives the pod end (of index ``index``, asked for if None) its address (and so the route
    to its subnet), its state and, if it is the pod's first interface, the default route; each
    step may be done already. The pod's lo is the runtime's: containerd (as CRI-O) runs the
    reference loopback plugin for every sandbox."""
    try:
        if index is None:
            index = _get_link(pod, ifname).index
        # In one round trip: the kernel carries them out in order.
        steps = [
            netlink.address_request(index, port.ip).tolerating(errno.EEXIST),
            netlink.link_request(index=index, up=True),
        ]
        if default_route:
            steps.append(netlink.default_route_request(port.gateway, index))
        pod.send_together(steps)
    except (NetlinkError, _NoSuchLink) as exc:
        raise DataplaneError(f"cannot configure {ifname} in the pod's netns: {exc}") from exc


@contextmanager
def _open_netns(path: str) -> Iterator[int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsNotFound(f"netns {path} does not exist") from None
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def _netlink_in_netns(netns_fd: int, netns: str) -> Iterator[Rtnetlink]:
    """A netlink client in the netns of ``netns_fd`` (path ``netns``), closed afterwards."""
    try:
        pod = netlink.open_in_netns(netns_fd)
    except OSError as exc:
        raise DataplaneError(f"netns {netns}: {exc}") from exc
    with pod:
        yield pod


def _random_local_mac() -> str:
    first, *rest = secrets.token_bytes(6)
    # Locally administered, unicast.
    return ":".join(f"{b:02x}" for b in [(first & 0xFC) | 0x02, *rest])
