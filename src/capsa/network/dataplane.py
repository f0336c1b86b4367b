"""The kernel side of a capsule's port: a Linux bridge per network and a veth per pod.

::

    dataplane = Dataplane()
    plugged = dataplane.plug(container_id, "/run/netns/cni-1234", "eth0", port)
    ...
    bridge = dataplane.unplug(container_id, "eth0")
    if bridge is not None:
        dataplane.remove_bridge_if_unused(bridge)

The pod end of the veth is created directly in the pod's netns (``IFLA_NET_NS_FD`` on the peer),
named ``CNI_IFNAME``, with the port's MAC, address and MTU and a default route via the gateway.
The host end is named after the CNI container id and ifname (:func:`host_ifname`), so that a DEL
for an old sandbox of a capsule can never unplug its newer sandbox; it joins the network's bridge.

Every method blocks on netlink: call them from worker threads, never from an event loop's thread
(pyroute2 0.9 runs its own event loop per socket). Creating a bridge, attaching a veth to it and
removing it are serialised per bridge, so that a pod never joins a bridge being removed; nothing
else is locked here.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Interface
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from capsa.log import get_logger
from capsa.network.types import Link, PluggedPort, PortBinding

log = get_logger(__name__)

HOST_IFNAME_PREFIX = "capsa"
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


class Dataplane:
    def __init__(self) -> None:
        self._bridge_locks: dict[str, threading.Lock] = {}
        self._bridge_locks_guard = threading.Lock()

    def ensure_bridge(self, name: str, gateway: IPv4Interface, mtu: int) -> Link:
        """The bridge ``name``, created if missing, with ``gateway`` as an address, up."""
        with self._bridge_lock(name), IPRoute() as ipr:
            _, bridge = _ensure_bridge(ipr, name, gateway, mtu)
        return bridge

    def plug(self, container_id: str, netns: str, ifname: str, port: PortBinding) -> PluggedPort:
        """Connects the netns at path ``netns`` to ``port.bridge`` through a new veth.

        Fails with InterfaceExists when ``ifname`` already exists in the netns. Whatever this call
        made is removed again if a later step fails.
        """
        # A MAC of our own for the host end saves asking the kernel which one it chose.
        host_end = Link(host_ifname(container_id, ifname), _random_local_mac())
        with (
            _open_netns(netns) as netns_fd,
            _netlink_in_netns(netns_fd, netns) as pod,
            IPRoute() as host,
        ):
            if pod.link_lookup(ifname=ifname):
                raise InterfaceExists(f"interface {ifname} already exists in netns {netns}")
            with self._bridge_lock(port.bridge):
                bridge_index, bridge = _ensure_bridge(
                    host, port.bridge, port.gateway_interface, port.mtu
                )
                _create_veth(host, host_end, bridge_index, netns_fd, netns, ifname, port)
            try:
                _configure_pod_end(pod, ifname, port)
            except BaseException:
                _remove_half_made(host, host_end.name)
                raise
        return PluggedPort(
            bridge=bridge,
            host_end=host_end,
            pod_end=Link(ifname, port.mac),
            netns=netns,
            address=port.ip,
            gateway=port.gateway,
        )

    def unplug(self, container_id: str, ifname: str) -> str | None:
        """Removes the veth of (container id, ifname); returns the bridge it was on, if any.

        Deleting the host end deletes the pod end with it, wherever its netns is, so unplug never
        needs the netns: it succeeds alike when the netns is gone, when the veth is gone, and for
        a container id it never saw.
        """
        name = host_ifname(container_id, ifname)
        with IPRoute() as ipr:
            try:
                link = _get_link(ipr, name)
            except _NoSuchLink:
                return None
            bridge = None
            master = link.get("master")
            if master:
                try:
                    bridge = _get_link(ipr, index=master).get("ifname")
                except _NoSuchLink:
                    bridge = None
            _delete_link(ipr, name)
        return bridge

    def remove_bridge_if_unused(self, name: str) -> bool:
        """Deletes the bridge ``name`` if no interface is attached to it; True if it did."""
        with self._bridge_lock(name), IPRoute() as ipr:
            try:
                bridge = _get_link(ipr, name)
            except _NoSuchLink:
                return False
            if bridge.get(("linkinfo", "kind")) != "bridge":
                return False
            if tuple(ipr.link("dump", master=bridge["index"])):
                return False
            _delete_link(ipr, name)
        log.info("bridge removed: its last port left", bridge=name)
        return True

    def check(self, container_id: str, netns: str, ifname: str, port: PortBinding) -> None:
        """Raises DataplaneError naming what differs from what plug made for ``port``."""
        host_name = host_ifname(container_id, ifname)
        problems: list[str] = []
        with (
            _open_netns(netns) as netns_fd,
            _netlink_in_netns(netns_fd, netns) as pod,
            IPRoute() as host,
        ):
            try:
                host_end = _get_link(host, host_name)
                master = host_end.get("master")
                on = _get_link(host, index=master).get("ifname") if master else None
                if on != port.bridge:
                    problems.append(f"host end {host_name} is on {on}, not {port.bridge}")
            except _NoSuchLink:
                problems.append(f"host end {host_name} is missing")
            try:
                pod_end = _get_link(pod, ifname)
                if pod_end.get("address") != port.mac:
                    problems.append(f"{ifname} has MAC {pod_end.get('address')}")
                addresses = {
                    (a.get("address"), a["prefixlen"])
                    for a in pod.addr("dump", index=pod_end["index"], family=socket.AF_INET)
                }
                if (str(port.ip.ip), port.ip.network.prefixlen) not in addresses:
                    problems.append(f"{ifname} lacks {port.ip}")
            except _NoSuchLink:
                problems.append(f"{ifname} is missing in netns {netns}")
        if problems:
            raise DataplaneError("; ".join(problems))

    def _bridge_lock(self, name: str) -> threading.Lock:
        with self._bridge_locks_guard:
            return self._bridge_locks.setdefault(name, threading.Lock())


class _NoSuchLink(Exception):
    pass


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
    try:
        link = _get_link(ipr, name)
    except _NoSuchLink:
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
    try:
        ipr.addr("add", index=index, address=str(gateway.ip), prefixlen=gateway.network.prefixlen)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise DataplaneError(f"cannot give bridge {name} the address {gateway}: {exc}") from exc
    if link.get("mtu") != mtu or not link["flags"] & _IFF_UP:
        ipr.link("set", index=index, mtu=mtu, state="up")
    return index, Link(name, link.get("address"))


def _create_veth(
    host: IPRoute,
    host_end: Link,
    bridge_index: int,
    netns_fd: int,
    netns: str,
    ifname: str,
    port: PortBinding,
) -> None:
    try:
        host.link(
            "add",
            ifname=host_end.name,
            address=host_end.mac,
            kind="veth",
            mtu=port.mtu,
            master=bridge_index,
            state="up",
            peer={"ifname": ifname, "net_ns_fd": netns_fd, "address": port.mac, "mtu": port.mtu},
        )
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise DataplaneError(
                f"cannot create veth {host_end.name} into netns {netns}: {exc}"
            ) from exc
        if host.link_lookup(ifname=host_end.name):
            raise DataplaneError(
                f"veth {host_end.name} already exists: the attachment ({ifname}) was added before "
                "and not deleted"
            ) from exc
        raise InterfaceExists(f"interface {ifname} already exists in netns {netns}") from exc


def _configure_pod_end(pod: IPRoute, ifname: str, port: PortBinding) -> None:
    try:
        index = _get_link(pod, ifname)["index"]
        pod.addr("add", index=index, address=str(port.ip.ip), prefixlen=port.ip.network.prefixlen)
        pod.link("set", index=index, state="up")
        pod.link("set", index=_LOOPBACK_INDEX, state="up")
        pod.route("add", dst="0.0.0.0/0", gateway=str(port.gateway), oif=index)
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
