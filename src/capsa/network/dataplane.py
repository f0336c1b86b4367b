"""The kernel side of a capsule's port: a Linux bridge per network and a veth per pod.

::

    dataplane = Dataplane()
    plugged = dataplane.plug(container_id, "/run/netns/cni-1234", "eth0", port, owner)
    ...
    removed = dataplane.unplug(container_id, "eth0")
    if removed is not None and removed.bridge:
        dataplane.remove_bridge_if_unused(removed.bridge)

The pod end of the veth is created directly in the pod's netns (``IFLA_NET_NS_FD`` on the peer),
named ``CNI_IFNAME``, with the port's MAC, address and MTU and a default route via the gateway.
The host end is named after the CNI container id and ifname (:func:`host_ifname`), so that a DEL
for an old sandbox of a capsule can never unplug its newer sandbox; it joins the network's bridge.
Its alias tags it as capsa's (:class:`AttachmentTag`: who made it, for which port and sandbox), so
that a GC can find the attachments a runtime no longer knows.

``plug`` is idempotent for one (container id, ifname) and repairs what a killed ADD left: a veth of
that name whose pod end is unconfigured is configured, one whose pod end is elsewhere is replaced,
a bridge without its address gets it.

Every method blocks on netlink: call them from worker threads, never from an event loop's thread
(pyroute2 0.9 runs its own event loop per socket). Creating a bridge, attaching a veth to it and
removing it are serialised per bridge, so that a pod never joins a bridge being removed; nothing
else is locked here.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Interface
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from capsa.log import get_logger
from capsa.network.types import Link, PluggedPort, PortBinding

log = get_logger(__name__)

HOST_IFNAME_PREFIX = "capsa"
# First word of the host end's alias: the veth is one of capsa's attachments.
ALIAS_MARK = "capsa-cni"
# The kernel keeps at most IFALIASZ - 1 bytes of an alias.
_ALIAS_MAX = 255
_IFF_UP = 0x1
# The kernel gives lo this index in every netns (LOOPBACK_IFINDEX).
_LOOPBACK_INDEX = 1
_CLONE_NEWNET = 0x40000000
_NETLINK_ROUTE = 0
_libc = ctypes.CDLL(None, use_errno=True)


class DataplaneError(Exception):
    """A step of binding a port failed; the message names the step, the objects and the cause."""


class NetnsNotFound(DataplaneError):
    pass


class InterfaceExists(DataplaneError):
    pass


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
        return f"{ALIAS_MARK} {self.owner} {self.port_id} {self.container_id}"[:_ALIAS_MAX]

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

    def ensure_bridge(self, name: str, gateway: IPv4Interface, mtu: int) -> Link:
        """The bridge ``name``, created if missing, with ``gateway`` as an address, up."""
        with self._bridge_lock(name), IPRoute() as ipr:
            _, bridge = _ensure_bridge(ipr, name, gateway, mtu)
        return bridge

    def plug(
        self,
        container_id: str,
        netns: str,
        ifname: str,
        port: PortBinding,
        owner: str,
        replaces: str | None = None,
    ) -> PluggedPort:
        """Connects the netns at path ``netns`` to ``port.bridge`` through a veth.

        Fails with InterfaceExists when ``ifname`` exists in the netns and is not this
        attachment's own pod end. Plugging the same attachment again completes and returns it.
        ``replaces`` names the host end of an older attachment of the port, removed once the new
        one is sure to be made (a failed check leaves it). Whatever this call made is removed
        again if a later step fails.
        """
        host_name = host_ifname(container_id, ifname)
        tag = AttachmentTag(owner, port.port_id, container_id)
        with (
            _open_netns(netns) as netns_fd,
            _netlink_in_netns(netns_fd, netns) as pod,
            IPRoute() as host,
        ):
            pod_end = _find_link(pod, ifname)
            # Only a pod end already there can be this attachment's own (a re-ADD, or an ADD
            # killed before it configured it); a host end alone shows up when creating.
            host_end = _find_link(host, host_name) if pod_end is not None else None
            if pod_end is not None and not _are_peers(host_end, pod_end):
                raise InterfaceExists(f"interface {ifname} already exists in netns {netns}")
            replaced = None
            if replaces and replaces != host_name and _remove_host_end(host, replaces):
                replaced = replaces
            with self._bridge_lock(port.bridge):
                bridge_index, bridge = _ensure_bridge(
                    host, port.bridge, port.gateway_interface, port.mtu
                )
                if host_end is None:
                    host_mac = _random_local_mac()
                    create_veth = functools.partial(
                        _create_veth, host, host_name, host_mac, bridge_index, netns_fd, netns
                    )
                    try:
                        create_veth(ifname, port)
                    except _HostEndExists:
                        # Its pod end is not in this netns: the leftover of an ADD that was killed,
                        # or of a netns that went. It is replaced.
                        log.info(
                            "removing a leftover veth of an earlier ADD",
                            veth=host_name,
                            container=container_id,
                            port=port.port_id,
                        )
                        _delete_link(host, host_name)
                        create_veth(ifname, port)
                    attach: dict[str, Any] = {}
                else:
                    host_mac = host_end.get("address")
                    attach = {"master": bridge_index, "mtu": port.mtu, "state": "up"}
                try:
                    host.link("set", ifname=host_name, ifalias=tag.alias(), **attach)
                except NetlinkError as exc:
                    _remove_half_made(host, host_name)
                    raise DataplaneError(
                        f"cannot tag and attach veth {host_name} to bridge {port.bridge}: {exc}"
                    ) from exc
            try:
                if pod_end is not None:
                    _reset_pod_end(pod, pod_end, ifname, port)
                _configure_pod_end(pod, ifname, port)
            except BaseException:
                _remove_half_made(host, host_name)
                raise
        return PluggedPort(
            bridge=bridge,
            host_end=Link(host_name, host_mac),
            pod_end=Link(ifname, port.mac),
            netns=netns,
            address=port.ip,
            gateway=port.gateway,
            mtu=port.mtu,
            replaced=replaced,
        )

    def unplug(self, container_id: str, ifname: str) -> Attachment | None:
        """Removes the veth of (container id, ifname); returns what it removed, if anything.

        Deleting the host end deletes the pod end with it, wherever its netns is, so unplug never
        needs the netns: it succeeds alike when the netns is gone, when the veth is gone, and for
        a container id it never saw.
        """
        return self.remove_attachment(host_ifname(container_id, ifname))

    def detach(self, container_id: str, ifname: str) -> Attachment | None:
        """Takes the veth of (container id, ifname) off the network: off its bridge and down, so
        that nothing reaches the pod or leaves it any more. Returns what it was, if anything.

        This is what a DEL waits for. Deleting the veth waits for the kernel far longer (15-20 ms
        on this kernel, for the network's grace period), and the veth goes anyway when its netns
        does, which the runtime deletes after the DEL: :meth:`remove_detached` follows later.
        """
        host_name = host_ifname(container_id, ifname)
        with IPRoute() as ipr:
            link = _find_link(ipr, host_name)
            if link is None or not _is_host_end(link):
                return None
            attachment = _attachment(ipr, link)
            if link.get("master") or link.get("state") != "down":
                try:
                    ipr.link("set", index=link["index"], master=0, state="down")
                except NetlinkError as exc:
                    if exc.code != errno.ENODEV:
                        raise
        return attachment

    def remove_detached(self, container_id: str, ifname: str) -> bool:
        """Deletes the veth of (container id, ifname) if it is still detached (an ADD of the same
        attachment since has put it back); True if it did."""
        host_name = host_ifname(container_id, ifname)
        with IPRoute() as ipr:
            link = _find_link(ipr, host_name)
            if link is None or not _is_host_end(link) or link.get("master"):
                return False
            _delete_link(ipr, host_name)
        return True

    def remove_attachment(self, host_name: str) -> Attachment | None:
        """Removes the attachment whose host end is ``host_name``, if that is one of capsa's
        veths; returns what it removed."""
        with IPRoute() as ipr:
            return _remove_host_end(ipr, host_name)

    def attachments(self) -> list[Attachment]:
        """Every host end of capsa's on this host, of every owner."""
        with IPRoute() as ipr:
            links = [link for link in ipr.link("dump") if _is_host_end(link)]
            return [_attachment(ipr, link) for link in links]

    def remove_bridge_if_unused(self, name: str) -> bool:
        """Deletes the bridge ``name`` if no pod is attached to it (with its overlay device, if
        it has one); True if it did."""
        with self._bridge_lock(name), IPRoute() as ipr:
            bridge = _find_link(ipr, name)
            if bridge is None or bridge.get(("linkinfo", "kind")) != "bridge":
                return False
            attached = [link.get("ifname") for link in ipr.link("dump", master=bridge["index"])]
            if any(link != overlay_name(name) for link in attached):
                return False
            if attached:
                _delete_link(ipr, overlay_name(name))
            _delete_link(ipr, name)
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
        with self._bridge_lock(bridge), IPRoute() as ipr:
            link = _find_link(ipr, bridge)
            if link is None:
                return False
            device = _find_link(ipr, name)
            if device is not None and (
                device.get(("linkinfo", "kind")) != "vxlan"
                or _vxlan_id(device) != vni
                or device.get("master") != link["index"]
            ):
                _delete_link(ipr, name)
                device = None
            try:
                if device is None:
                    ipr.link(
                        "add",
                        ifname=name,
                        kind="vxlan",
                        vxlan_id=vni,
                        vxlan_local=local_ip,
                        vxlan_port=port,
                        vxlan_learning=0,
                        mtu=mtu,
                    )
                    log.info("overlay device created", device=name, bridge=bridge, vni=vni)
                index = _get_link(ipr, name)["index"]
                ipr.link("set", index=index, master=link["index"], state="up")
                _sync_fdb(ipr, index, macs)
            except (NetlinkError, _NoSuchLink) as exc:
                raise DataplaneError(f"cannot program overlay device {name}: {exc}") from exc
        return True

    def remove_overlay(self, bridge: str) -> None:
        """Deletes the VXLAN device of the network of ``bridge``, if it has one."""
        with self._bridge_lock(bridge), IPRoute() as ipr:
            if _find_link(ipr, overlay_name(bridge)) is not None:
                _delete_link(ipr, overlay_name(bridge))

    def check(self, container_id: str, netns: str, ifname: str, port: PortBinding) -> None:
        """Raises DataplaneError naming what differs from what plug made for ``port``."""
        host_name = host_ifname(container_id, ifname)
        problems: list[str] = []
        with (
            _open_netns(netns) as netns_fd,
            _netlink_in_netns(netns_fd, netns) as pod,
            IPRoute() as host,
        ):
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
                problems += _pod_end_problems(pod, pod_end, ifname, port)
        if problems:
            raise DataplaneError("; ".join(problems))

    def _bridge_lock(self, name: str) -> threading.Lock:
        with self._bridge_locks_guard:
            return self._bridge_locks.setdefault(name, threading.Lock())


class _NoSuchLink(Exception):
    pass


# The MAC of a forwarding entry that floods broadcasts and unknown unicast to a remote host.
_FLOOD_MAC = "00:00:00:00:00:00"


def overlay_name(bridge: str) -> str:
    """The VXLAN device of the network whose bridge is ``bridge`` (cbr-X -> cvx-X)."""
    return "cvx-" + bridge.removeprefix("cbr-")


def _vxlan_id(link: Any) -> int | None:
    vni = link.get(("linkinfo", "data", "vxlan_id"))
    return int(vni) if vni is not None else None


def _sync_fdb(ipr: IPRoute, index: int, macs: dict[str, str]) -> None:
    wanted = set(macs.items()) | {(_FLOOD_MAC, ip) for ip in set(macs.values())}
    current = {
        (entry.get("lladdr"), entry.get("dst"))
        for entry in ipr.fdb("dump", ifindex=index)
        if entry.get("ifindex") == index and entry.get("dst")
    }
    for mac, dst in current - wanted:
        ipr.fdb("del", ifindex=index, lladdr=mac, dst=dst)
    for mac, dst in sorted(wanted - current):
        ipr.fdb("append", ifindex=index, lladdr=mac, dst=dst)


def _get_link(ipr: IPRoute, name: str | None = None, index: int | None = None) -> Any:
    try:
        if name is not None:
            (link,) = ipr.link("get", ifname=name)
        else:
            (link,) = ipr.link("get", index=index)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            raise _NoSuchLink(name or index) from None
        raise
    return link


def _find_link(ipr: IPRoute, name: str) -> Any:
    """The link ``name``, or None."""
    try:
        return _get_link(ipr, name)
    except _NoSuchLink:
        return None


def _remove_host_end(ipr: IPRoute, host_name: str) -> Attachment | None:
    link = _find_link(ipr, host_name)
    if link is None or not _is_host_end(link):
        return None
    attachment = _attachment(ipr, link)
    _delete_link(ipr, host_name)
    return attachment


def _is_host_end(link: Any) -> bool:
    return bool(
        link.get("ifname", "").startswith(HOST_IFNAME_PREFIX)
        and link.get(("linkinfo", "kind")) == "veth"
    )


def _are_peers(host_end: Any, pod_end: Any) -> bool:
    """Whether two veth ends, seen from their own netns, point at each other."""
    return bool(
        host_end is not None
        and pod_end is not None
        and pod_end.get(("linkinfo", "kind")) == "veth"
        and pod_end.get("link") == host_end["index"]
        and host_end.get("link") == pod_end["index"]
    )


def _attachment(ipr: IPRoute, link: Any) -> Attachment:
    bridge = None
    master = link.get("master")
    if master:
        try:
            bridge = _get_link(ipr, index=master).get("ifname")
        except _NoSuchLink:
            bridge = None
    return Attachment(link.get("ifname"), bridge, AttachmentTag.parse(link.get("ifalias")))


def _host_end_problems(host: IPRoute, host_end: Any, port: PortBinding) -> list[str]:
    name = host_end.get("ifname")
    problems = []
    master = host_end.get("master")
    try:
        on = _get_link(host, index=master).get("ifname") if master else None
    except _NoSuchLink:
        on = None
    if on != port.bridge:
        problems.append(f"host end {name} is on {on}, not {port.bridge}")
    if not host_end["flags"] & _IFF_UP:
        problems.append(f"host end {name} is down")
    bridge = _find_link(host, port.bridge)
    if bridge is not None and port.gateway_interface not in _addresses(host, bridge["index"]):
        problems.append(f"bridge {port.bridge} lacks the gateway address {port.gateway_interface}")
    return problems


def _pod_end_problems(pod: IPRoute, pod_end: Any, ifname: str, port: PortBinding) -> list[str]:
    problems = []
    if pod_end.get("address") != port.mac:
        problems.append(f"{ifname} has MAC {pod_end.get('address')}, not {port.mac}")
    if not pod_end["flags"] & _IFF_UP:
        problems.append(f"{ifname} is down")
    if port.ip not in _addresses(pod, pod_end["index"]):
        problems.append(f"{ifname} lacks {port.ip}")
    default_routes = pod.route("dump", family=socket.AF_INET, dst_len=0)
    if not any(
        r.get("oif") == pod_end["index"] and r.get("gateway") == str(port.gateway)
        for r in default_routes
    ):
        problems.append(f"{ifname} has no default route via {port.gateway}")
    return problems


def _addresses(ipr: IPRoute, index: int) -> set[IPv4Interface]:
    return {
        IPv4Interface(f"{a.get('address')}/{a['prefixlen']}")
        for a in ipr.addr("dump", index=index, family=socket.AF_INET)
    }


def _delete_link(ipr: IPRoute, name: str) -> None:
    try:
        ipr.link("del", ifname=name)
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:
            raise


def _remove_half_made(ipr: IPRoute, name: str) -> None:
    # The caller raises the original failure; this one only needs to be known.
    try:
        _delete_link(ipr, name)
    except NetlinkError as exc:
        log.warning("cannot remove a half-made veth", veth=name, error=str(exc))


def _ensure_bridge(ipr: IPRoute, name: str, gateway: IPv4Interface, mtu: int) -> tuple[int, Link]:
    link = _find_link(ipr, name)
    if link is None:
        try:
            # An explicit MAC keeps the gateway's MAC stable: a bridge with a random one adopts
            # the lowest MAC of its ports, which changes as pods come and go.
            ipr.link("add", ifname=name, kind="bridge", mtu=mtu, address=_random_local_mac())
            log.info("bridge created", bridge=name, gateway=str(gateway), mtu=mtu)
        except NetlinkError as exc:
            # Another process made it first.
            if exc.code != errno.EEXIST:
                raise DataplaneError(f"cannot create bridge {name}: {exc}") from exc
        link = _get_link(ipr, name)
    kind = link.get(("linkinfo", "kind"))
    if kind != "bridge":
        raise DataplaneError(
            f"interface {name} exists but is a {kind or 'non-bridge'} interface: "
            "the network's bridge name must be free for capsa"
        )
    index: int = link["index"]
    # Also completes a bridge that a killed ADD left without its address.
    try:
        ipr.addr("add", index=index, address=str(gateway.ip), prefixlen=gateway.network.prefixlen)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise DataplaneError(f"cannot give bridge {name} the address {gateway}: {exc}") from exc
    if link.get("mtu") != mtu or not link["flags"] & _IFF_UP:
        ipr.link("set", index=index, mtu=mtu, state="up")
    return index, Link(name, link.get("address"))


class _HostEndExists(Exception):
    pass


def _create_veth(
    host: IPRoute,
    host_name: str,
    host_mac: str,
    bridge_index: int,
    netns_fd: int,
    netns: str,
    ifname: str,
    port: PortBinding,
) -> None:
    """Creates the veth on the bridge, up, its peer in the pod's netns. Raises _HostEndExists if a
    link named ``host_name`` is in the way."""
    try:
        host.link(
            "add",
            ifname=host_name,
            address=host_mac,
            kind="veth",
            mtu=port.mtu,
            master=bridge_index,
            state="up",
            peer={"ifname": ifname, "net_ns_fd": netns_fd, "address": port.mac, "mtu": port.mtu},
        )
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
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


def _reset_pod_end(pod: IPRoute, pod_end: Any, ifname: str, port: PortBinding) -> None:
    """Gives a pod end that an earlier ADD made the port's MAC and MTU, if it lacks them."""
    if pod_end.get("address") == port.mac and pod_end.get("mtu") == port.mtu:
        return
    try:
        pod.link("set", index=pod_end["index"], state="down")
        pod.link("set", index=pod_end["index"], address=port.mac, mtu=port.mtu)
    except NetlinkError as exc:
        raise DataplaneError(f"cannot reset {ifname} in the pod's netns: {exc}") from exc


def _configure_pod_end(pod: IPRoute, ifname: str, port: PortBinding) -> None:
    """Gives the pod end its address, state and default route; each step may be done already."""
    try:
        index = _get_link(pod, ifname)["index"]
        try:
            pod.addr(
                "add", index=index, address=str(port.ip.ip), prefixlen=port.ip.network.prefixlen
            )
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        pod.link("set", index=index, state="up")
        pod.link("set", index=_LOOPBACK_INDEX, state="up")
        pod.route("replace", dst="0.0.0.0/0", gateway=str(port.gateway), oif=index)
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
def _netlink_in_netns(netns_fd: int, netns: str) -> Iterator[IPRoute]:
    """An IPRoute whose socket lives in the netns of ``netns_fd``.

    A socket stays in the netns it was created in, and setns() of a network namespace moves only
    the calling thread. So a short-lived thread enters the netns, creates the socket and ends,
    which costs about 0.1 ms (``IPRoute(netns=...)`` forks a process for it: about 7 ms) and
    leaves no thread of ours in a pod's netns.
    """
    created: list[socket.socket] = []
    failure: list[OSError] = []

    def create() -> None:
        if _libc.setns(netns_fd, _CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            failure.append(OSError(code, f"cannot enter netns {netns}: {os.strerror(code)}"))
            return
        try:
            created.append(socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_ROUTE))
        except OSError as exc:
            failure.append(exc)

    thread = threading.Thread(target=create, name="capsa-netns-socket")
    thread.start()
    thread.join()
    if failure:
        raise DataplaneError(str(failure[0])) from failure[0]
    ipr = IPRoute(fileno=created[0].detach())
    try:
        yield ipr
    finally:
        ipr.close()


def _random_local_mac() -> str:
    first, *rest = secrets.token_bytes(6)
    # Locally administered, unicast.
    return ":".join(f"{b:02x}" for b in [(first & 0xFC) | 0x02, *rest])
