"""capsa's own rtnetlink client: the links, addresses, routes and forwarding entries that the host
data plane manages, over a plain ``NETLINK_ROUTE`` socket, on the standard library only.

::

    from capsa.network import netlink

    with netlink.Rtnetlink() as nl:
        nl.add_bridge("cbr-demo", mtu=1500, address="02:00:00:00:00:01")
        bridge = nl.get_link(name="cbr-demo")
        nl.send(netlink.address_request(bridge.index, IPv4Interface("10.1.0.1/24")))
        nl.send(netlink.link_request(index=bridge.index, up=True))
        try:
            nl.add_bridge("cbr-demo", mtu=1500)
        except netlink.NetlinkError as exc:
            assert exc.errno == errno.EEXIST
        nl.delete_link(index=bridge.index)

Why not a library: a request on a raw socket costs microseconds, and the CNI path makes a dozen
of them per pod; pyroute2 costs 0.3 ms per request and per socket (an asyncio loop of its own per
socket) and 8.5 MB of memory.

Each request waits for the kernel's answer (an ACK, the object asked for, or a whole dump) and
raises :class:`NetlinkError` with the kernel's errno, and its extended message when it gives one.
Replies are matched to requests by sequence number, so a socket left with unread replies (an
exception between send and receive) serves the next request correctly; a socket still serves one
thread at a time. :class:`SocketPool` lends the sockets of this process's netns to threads and
keeps them for reuse; :func:`open_in_netns` opens one in another network namespace.

Constants and layouts come from the kernel's uapi headers: ``linux/netlink.h``,
``linux/rtnetlink.h``, ``linux/if_link.h``, ``linux/if_addr.h``, ``linux/neighbour.h`` and
``linux/veth.h``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from types import TracebackType

# linux/netlink.h
NETLINK_ROUTE = 0
_SOL_NETLINK = 270
_NETLINK_CAP_ACK = 10
_NETLINK_EXT_ACK = 11
_NETLINK_GET_STRICT_CHK = 12
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_ECHO = 0x08
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
# Flags of an NLMSG_ERROR: the request is not echoed back; extended attributes follow.
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1
NLA_F_NESTED = 1 << 15
_NLA_TYPE_MASK = ~(NLA_F_NESTED | (1 << 14)) & 0xFFFF

# linux/rtnetlink.h
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_SETLINK = 19
RTM_NEWADDR = 20
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_GETROUTE = 26
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
RTM_GETNEIGH = 30
RT_TABLE_MAIN = 254
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_TABLE = 15
RTEXT_FILTER_SKIP_STATS = 1 << 3

# linux/if_link.h, linux/veth.h, linux/if.h
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINK = 5
IFLA_MASTER = 10
IFLA_PROTINFO = 12
IFLA_LINKINFO = 18
IFLA_IFALIAS = 20
IFLA_NET_NS_FD = 28
IFLA_EXT_MASK = 29
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_INFO_SLAVE_DATA = 5
# A bridge port's settings (IFLA_PROTINFO of an AF_BRIDGE request, IFLA_INFO_SLAVE_DATA of a link).
IFLA_BRPORT_UNICAST_FLOOD = 9
IFLA_BRPORT_FLUSH = 24
IFLA_BRPORT_MCAST_FLOOD = 27
IFLA_BRPORT_BCAST_FLOOD = 30
IFLA_BRPORT_LOCKED = 39
VETH_INFO_PEER = 1
IFLA_VXLAN_ID = 1
IFLA_VXLAN_LOCAL = 4
IFLA_VXLAN_LEARNING = 7
IFLA_VXLAN_PORT = 15
IFF_UP = 0x1
# The kernel keeps at most IFALIASZ - 1 bytes of an alias.
IFALIAS_MAX = 255

# linux/if_addr.h
IFA_ADDRESS = 1
IFA_LOCAL = 2

# linux/neighbour.h
NDA_DST = 1
NDA_LLADDR = 2
NDA_IFINDEX = 8
NDA_MASTER = 9
NTF_SELF = 0x02
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, port id
_ATTR = struct.Struct("=HH")  # nlattr: length, type
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope,
# type, flags
_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
_BE16 = struct.Struct("!H")

# Large enough for any datagram of a dump: the kernel fills them up to 32 KiB.
_RECEIVE_SIZE = 65536
# A dump that the kernel marks inconsistent (links came or went during it) is asked again.
_DUMP_ATTEMPTS = 5
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetlinkError(OSError):
    """The kernel refused a request; ``errno`` says why (EEXIST, ENODEV, ...)."""

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(code, os.strerror(code) + (f" ({detail})" if detail else ""))


class RequestFailed(NetlinkError):
    """Requests of :meth:`Rtnetlink.send_together` failed: ``failures`` has each one's error by
    its position (from 0); the exception's errno and message are the first's."""

    def __init__(self, failures: dict[int, NetlinkError]) -> None:
        first = failures[min(failures)]
        OSError.__init__(self, first.errno, first.strerror)
        self.failures = failures


@dataclass(frozen=True, slots=True)
class Link:
    """A network interface as the kernel describes it (``RTM_NEWLINK``)."""

    index: int
    ifname: str
    flags: int
    address: str | None = None
    mtu: int | None = None
    # The index of the link this one is enslaved to (a bridge), if any.
    master: int | None = None
    # The peer's index of a veth, in the peer's own netns.
    link: int | None = None
    ifalias: str | None = None
    kind: str | None = None
    vxlan_id: int | None = None
    # A bridge port that passes no frame (see bridge_port_request).
    port_locked: bool = False

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)


@dataclass(frozen=True, slots=True)
class Address:
    """An address of an interface (``RTM_NEWADDR``)."""

    index: int
    family: int
    address: str
    prefixlen: int


@dataclass(frozen=True, slots=True)
class Route:
    """A route (``RTM_NEWROUTE``); ``dst`` is None for a default route."""

    family: int
    dst_len: int
    table: int
    dst: str | None = None
    gateway: str | None = None
    oif: int | None = None


@dataclass(frozen=True, slots=True)
class Neighbour:
    """A neighbour or forwarding database entry (``RTM_NEWNEIGH``)."""

    family: int
    ifindex: int
    state: int
    flags: int
    lladdr: str | None = None
    dst: str | None = None
    master: int | None = None


# Encoding.


def attribute(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to the next 4-byte boundary."""
    length = _ATTR.size + len(payload)
    return _ATTR.pack(length, kind) + payload + bytes(-length % 4)


def nested(kind: int, *attributes: bytes) -> bytes:
    """An attribute holding other attributes."""
    return attribute(kind | NLA_F_NESTED, b"".join(attributes))


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """A netlink message: its header, then ``body`` (a family header and its attributes)."""
    return _HEADER.pack(_HEADER.size + len(body), kind, flags, seq, 0) + body


def _u8(kind: int, value: int) -> bytes:
    return attribute(kind, bytes((value,)))


def _u32(kind: int, value: int) -> bytes:
    return attribute(kind, _U32.pack(value))


def _string(kind: int, value: str) -> bytes:
    return attribute(kind, value.encode() + b"\0")


def _mac(kind: int, value: str) -> bytes:
    return attribute(kind, bytes.fromhex(value.replace(":", "")))


def _ipv4(kind: int, value: IPv4Address | str) -> bytes:
    return attribute(kind, IPv4Address(value).packed)


def _ifinfomsg(index: int = 0, up: bool | None = None) -> bytes:
    # ifi_change names the flags to change: only IFF_UP, and only when asked.
    flags = IFF_UP if up else 0
    change = IFF_UP if up is not None else 0
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)


def _link_selector(name: str | None, index: int | None) -> tuple[int, bytes]:
    if (name is None) == (index is None):
        raise ValueError("name a link by exactly one of name and index")
    if index is not None:
        return index, b""
    assert name is not None
    return 0, _string(IFLA_IFNAME, name)


# Decoding.


def parse_messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """The messages of one datagram as (type, flags, seq, payload)."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, flags, seq, _ = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            raise NetlinkError(errno.EBADMSG, f"truncated netlink message of {length} bytes")
        yield kind, flags, seq, data[offset + _HEADER.size : offset + length]
        offset += (length + 3) & ~3


def parse_attributes(
    data: bytes, offset: int = 0, wanted: frozenset[int] | None = None
) -> dict[int, bytes]:
    """The attributes from ``offset`` to the end of ``data`` by type (flags masked off), only
    those of the ``wanted`` types if given."""
    found: dict[int, bytes] = {}
    end = len(data)
    while offset + _ATTR.size <= end:
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size or offset + length > end:
            raise NetlinkError(errno.EBADMSG, f"malformed netlink attribute {kind}")
        kind &= _NLA_TYPE_MASK
        if wanted is None or kind in wanted:
            found[kind] = data[offset + _ATTR.size : offset + length]
        offset += (length + 3) & ~3
    return found


def _text(value: bytes | None) -> str | None:
    return value.split(b"\0", 1)[0].decode(errors="replace") if value is not None else None


def _number(value: bytes | None) -> int | None:
    return _U32.unpack(value)[0] if value is not None else None


def _hardware_address(value: bytes | None) -> str | None:
    return value.hex(":") if value else None


def _ip(value: bytes | None) -> str | None:
    if value is None:
        return None
    return socket.inet_ntop(socket.AF_INET if len(value) == 4 else socket.AF_INET6, value)


# A link comes with some 40 attributes; copying only these halves the time to decode it.
_LINK_ATTRIBUTES = frozenset(
    (IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER, IFLA_LINKINFO, IFLA_IFALIAS)
)
_PORT_ATTRIBUTES = frozenset((IFLA_BRPORT_LOCKED,))


def decode_link(payload: bytes) -> Link:
    _, _, index, flags, _ = _IFINFOMSG.unpack_from(payload)
    attributes = parse_attributes(payload, _IFINFOMSG.size, _LINK_ATTRIBUTES)
    kind = vxlan_id = None
    port_locked = False
    if IFLA_LINKINFO in attributes:
        info = parse_attributes(attributes[IFLA_LINKINFO])
        kind = _text(info.get(IFLA_INFO_KIND))
        if kind == "vxlan" and IFLA_INFO_DATA in info:
            vxlan_id = _number(parse_attributes(info[IFLA_INFO_DATA]).get(IFLA_VXLAN_ID))
        if IFLA_INFO_SLAVE_DATA in info:
            port = parse_attributes(info[IFLA_INFO_SLAVE_DATA], wanted=_PORT_ATTRIBUTES)
            locked = port.get(IFLA_BRPORT_LOCKED)
            port_locked = bool(locked and locked[0])
    return Link(
        index=index,
        ifname=_text(attributes.get(IFLA_IFNAME)) or "",
        flags=flags,
        address=_hardware_address(attributes.get(IFLA_ADDRESS)),
        mtu=_number(attributes.get(IFLA_MTU)),
        master=_number(attributes.get(IFLA_MASTER)) or None,
        link=_number(attributes.get(IFLA_LINK)),
        ifalias=_text(attributes.get(IFLA_IFALIAS)),
        kind=kind,
        vxlan_id=vxlan_id,
        port_locked=port_locked,
    )


def decode_address(payload: bytes) -> Address:
    family, prefixlen, _, _, index = _IFADDRMSG.unpack_from(payload)
    attributes = parse_attributes(payload, _IFADDRMSG.size)
    # IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on a point-to-point link.
    local = attributes.get(IFA_LOCAL, attributes.get(IFA_ADDRESS))
    return Address(index=index, family=family, address=_ip(local) or "", prefixlen=prefixlen)


def decode_route(payload: bytes) -> Route:
    family, dst_len, _, _, table, _, _, _, _ = _RTMSG.unpack_from(payload)
    attributes = parse_attributes(payload, _RTMSG.size)
    return Route(
        family=family,
        dst_len=dst_len,
        # Tables above 255 only fit the attribute.
        table=_number(attributes.get(RTA_TABLE)) or table,
        dst=_ip(attributes.get(RTA_DST)),
        gateway=_ip(attributes.get(RTA_GATEWAY)),
        oif=_number(attributes.get(RTA_OIF)),
    )


def decode_neighbour(payload: bytes) -> Neighbour:
    family, ifindex, state, flags, _ = _NDMSG.unpack_from(payload)
    attributes = parse_attributes(payload, _NDMSG.size)
    return Neighbour(
        family=family,
        ifindex=ifindex,
        state=state,
        flags=flags,
        lladdr=_hardware_address(attributes.get(NDA_LLADDR)),
        dst=_ip(attributes.get(NDA_DST)),
        master=_number(attributes.get(NDA_MASTER)),
    )


def decode_error(flags: int, payload: bytes) -> NetlinkError | None:
    """The error an NLMSG_ERROR (or an NLMSG_DONE) carries; None for an ACK."""
    (code,) = _I32.unpack_from(payload)
    if code == 0:
        return None
    detail = ""
    if flags & NLM_F_ACK_TLVS and len(payload) > _I32.size:
        # The request's header follows the error code, then its payload unless capped.
        offset = _I32.size
        if len(payload) >= offset + _HEADER.size:
            (request_length,) = _U32.unpack_from(payload, offset)
            offset += _HEADER.size if flags & NLM_F_CAPPED else (request_length + 3) & ~3
        detail = _text(parse_attributes(payload, offset).get(NLMSGERR_ATTR_MSG)) or ""
    return NetlinkError(-code, detail)


@dataclass(frozen=True)
class Request:
    """A request that expects nothing but the kernel's acknowledgement, built apart from its
    sending so that several can go in one message (:meth:`Rtnetlink.send_together`).
    ``tolerated``: error numbers that do not fail it (EEXIST for what may be there already)."""

    kind: int
    flags: int
    body: bytes
    tolerated: frozenset[int] = frozenset()

    def tolerating(self, *errnos: int) -> Request:
        return Request(self.kind, self.flags, self.body, self.tolerated | frozenset(errnos))


def link_request(
    *,
    name: str | None = None,
    index: int | None = None,
    master: int | None = None,
    up: bool | None = None,
    mtu: int | None = None,
    address: str | None = None,
    alias: str | None = None,
) -> Request:
    """Changes what is given of a link: ``master`` 0 takes it off its bridge; ``alias`` ""
    removes its alias."""
    index, selector = _link_selector(name, index)
    body = _ifinfomsg(index, up) + selector
    if master is not None:
        body += _u32(IFLA_MASTER, master)
    if mtu is not None:
        body += _u32(IFLA_MTU, mtu)
    if address is not None:
        body += _mac(IFLA_ADDRESS, address)
    if alias is not None:
        # Without a terminating NUL: the kernel counts it in the alias's length.
        body += attribute(IFLA_IFALIAS, alias.encode())
    return Request(RTM_SETLINK, NLM_F_REQUEST, body)


def bridge_port_request(index: int, *, locked: bool) -> Request:
    """Sets what the bridge port ``index`` lets through. Locked, it passes no frame either way:
    the bridge drops what enters by it from a MAC it has no static entry for (it has none there),
    floods nothing to it, and forgets the MACs it learnt on it, so nothing is forwarded to it
    either (but for multicast to a group joined through it, which goes by the bridge's group
    table when a multicast querier is on the segment; capsa's bridges run none). Unlocked, it is
    as a new port is (no lock, flooding). Unlike taking the link down or off its bridge, this
    does not wait for the network's grace period."""
    flooding = int(not locked)
    settings = [
        _u8(IFLA_BRPORT_LOCKED, int(locked)),
        _u8(IFLA_BRPORT_UNICAST_FLOOD, flooding),
        _u8(IFLA_BRPORT_MCAST_FLOOD, flooding),
        _u8(IFLA_BRPORT_BCAST_FLOOD, flooding),
    ]
    if locked:
        settings.append(attribute(IFLA_BRPORT_FLUSH, b""))
    header = _IFINFOMSG.pack(socket.AF_BRIDGE, 0, index, 0, 0)
    return Request(RTM_SETLINK, NLM_F_REQUEST, header + nested(IFLA_PROTINFO, *settings))


def address_request(index: int, interface: IPv4Interface) -> Request:
    """Gives the link ``index`` an IPv4 address; fails with EEXIST if it has it."""
    header = _IFADDRMSG.pack(
        socket.AF_INET, interface.network.prefixlen, 0, RT_SCOPE_UNIVERSE, index
    )
    body = header + _ipv4(IFA_LOCAL, interface.ip) + _ipv4(IFA_ADDRESS, interface.ip)
    return Request(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL, body)


def default_route_request(gateway: IPv4Address, oif: int) -> Request:
    """Makes the main table's IPv4 default route go via ``gateway`` out of link ``oif``."""
    header = _RTMSG.pack(
        socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0
    )
    body = header + _ipv4(RTA_GATEWAY, gateway) + _u32(RTA_OIF, oif)
    return Request(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE, body)


def veth_request(
    name: str,
    *,
    peer: str,
    peer_netns_fd: int | None = None,
    peer_address: str | None = None,
    peer_mtu: int | None = None,
    address: str | None = None,
    mtu: int | None = None,
    master: int | None = None,
    up: bool = False,
) -> Request:
    """The request that creates a veth pair (sent with :meth:`Rtnetlink.send_together`):
    ``name`` here (with its address, MTU, master and state) and ``peer`` in the netns of
    ``peer_netns_fd`` (this one if None), down. It asks the kernel to echo the new link, whose
    ``link`` is then the peer's index in its netns (kernels that honour NLM_F_ECHO on a link's
    creation do, 6.18 here), which saves asking for the peer."""
    peer_attributes = _string(IFLA_IFNAME, peer)
    if peer_address is not None:
        peer_attributes += _mac(IFLA_ADDRESS, peer_address)
    if peer_mtu is not None:
        peer_attributes += _u32(IFLA_MTU, peer_mtu)
    if peer_netns_fd is not None:
        peer_attributes += _u32(IFLA_NET_NS_FD, peer_netns_fd)
    body = _ifinfomsg(up=True if up else None) + _string(IFLA_IFNAME, name)
    if address is not None:
        body += _mac(IFLA_ADDRESS, address)
    if mtu is not None:
        body += _u32(IFLA_MTU, mtu)
    if master is not None:
        body += _u32(IFLA_MASTER, master)
    body += nested(
        IFLA_LINKINFO,
        _string(IFLA_INFO_KIND, "veth"),
        # The peer is described like a link of its own: its ifinfomsg, then its attributes.
        nested(IFLA_INFO_DATA, nested(VETH_INFO_PEER, _ifinfomsg() + peer_attributes)),
    )
    return Request(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | NLM_F_ECHO, body)


class _DumpInterrupted(Exception):
    pass


# The socket.


def _route_socket() -> socket.socket:
    """A NETLINK_ROUTE socket of the calling thread's netns, which is this process's."""
    _ensure_home()
    return _new_route_socket()


def _new_route_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    try:
        # Errors without the request echoed back, with the kernel's message; filters in dump
        # requests applied by the kernel (and bad requests refused instead of ignored).
        for option in (_NETLINK_CAP_ACK, _NETLINK_EXT_ACK, _NETLINK_GET_STRICT_CHK):
            sock.setsockopt(_SOL_NETLINK, option, 1)
        sock.bind((0, 0))
    except BaseException:
        sock.close()
        raise
    return sock


class Rtnetlink:
    """A client of the kernel's routing netlink over one socket; one thread at a time.

    ``sock`` defaults to a new rtnetlink socket of the calling thread's netns; the client owns it
    and closes it with :meth:`close`.
    """

    def __init__(self, sock: socket.socket | None = None) -> None:
        self._sock = sock if sock is not None else _route_socket()
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Rtnetlink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # Links.

    def get_link(self, *, name: str | None = None, index: int | None = None) -> Link:
        """The link of that name or index; NetlinkError ENODEV if there is none."""
        index, selector = _link_selector(name, index)
        body = _ifinfomsg(index) + selector + _u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
        (payload,) = self._request(RTM_GETLINK, NLM_F_REQUEST, body, RTM_NEWLINK)
        return decode_link(payload)

    def links(self, *, master: int | None = None) -> list[Link]:
        """Every link of the netns, or those enslaved to the link of index ``master``."""
        body = _ifinfomsg() + _u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
        if master is not None:
            body += _u32(IFLA_MASTER, master)
        return [decode_link(p) for p in self._dump(RTM_GETLINK, body, RTM_NEWLINK)]

    def add_bridge(self, name: str, *, mtu: int, address: str | None = None) -> None:
        """Creates a bridge, down; an explicit ``address`` keeps the bridge's MAC fixed (else it
        follows the lowest MAC of its ports)."""
        attributes = [_string(IFLA_IFNAME, name), _u32(IFLA_MTU, mtu)]
        if address is not None:
            attributes.append(_mac(IFLA_ADDRESS, address))
        self._create_link(attributes, nested(IFLA_LINKINFO, _string(IFLA_INFO_KIND, "bridge")))

    def add_vxlan(
        self,
        name: str,
        *,
        vni: int,
        local: IPv4Address | str,
        port: int,
        mtu: int,
        learning: bool = False,
    ) -> None:
        """Creates a VXLAN device, down: VNI ``vni``, tunnel source ``local``, UDP ``port``."""
        data = nested(
            IFLA_INFO_DATA,
            _u32(IFLA_VXLAN_ID, vni),
            _ipv4(IFLA_VXLAN_LOCAL, local),
            attribute(IFLA_VXLAN_PORT, _BE16.pack(port)),
            _u8(IFLA_VXLAN_LEARNING, int(learning)),
        )
        self._create_link(
            [_string(IFLA_IFNAME, name), _u32(IFLA_MTU, mtu)],
            nested(IFLA_LINKINFO, _string(IFLA_INFO_KIND, "vxlan"), data),
        )

    def delete_link(self, *, name: str | None = None, index: int | None = None) -> None:
        """Deletes a link (a veth with its peer); NetlinkError ENODEV if there is none."""
        index, selector = _link_selector(name, index)
        self._request(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, _ifinfomsg(index) + selector)

    def _create_link(self, attributes: list[bytes], linkinfo: bytes) -> None:
        body = _ifinfomsg() + b"".join(attributes) + linkinfo
        self._request(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)

    # Addresses.

    def addresses(self, index: int, family: int = socket.AF_INET) -> list[Address]:
        """The addresses of ``family`` on the link ``index``."""
        body = _IFADDRMSG.pack(family, 0, 0, 0, index)
        return [decode_address(p) for p in self._dump(RTM_GETADDR, body, RTM_NEWADDR)]

    # Routes.

    def routes(self, family: int = socket.AF_INET, dst_len: int | None = None) -> list[Route]:
        """The routes of ``family`` in every table, those of prefix length ``dst_len`` if given
        (0: default routes)."""
        body = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        routes = [decode_route(p) for p in self._dump(RTM_GETROUTE, body, RTM_NEWROUTE)]
        # The kernel does not filter route dumps by prefix length.
        return [r for r in routes if dst_len is None or r.dst_len == dst_len]

    # Forwarding database (bridges and VXLAN devices).

    def fdb_entries(self, ifindex: int) -> list[Neighbour]:
        """The forwarding entries of the link ``ifindex``: its own (a VXLAN device's remote
        entries) and, for a bridge port, the bridge's entries for it."""
        body = _NDMSG.pack(socket.AF_BRIDGE, 0, 0, 0, 0) + _u32(NDA_IFINDEX, ifindex)
        return [decode_neighbour(p) for p in self._dump(RTM_GETNEIGH, body, RTM_NEWNEIGH)]

    def append_fdb(self, ifindex: int, lladdr: str, dst: IPv4Address | str) -> None:
        """Adds a permanent entry to the link's own forwarding database: frames to ``lladdr``
        go to the tunnel endpoint ``dst``. Appending lets one MAC (00:00:00:00:00:00, the
        flood entry) have several endpoints."""
        self._fdb(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_APPEND, ifindex, lladdr, dst)

    def delete_fdb(self, ifindex: int, lladdr: str, dst: IPv4Address | str) -> None:
        """Deletes the entry (``lladdr``, ``dst``); NetlinkError ENOENT if there is none."""
        self._fdb(RTM_DELNEIGH, 0, ifindex, lladdr, dst)

    def _fdb(
        self, kind: int, flags: int, ifindex: int, lladdr: str, dst: IPv4Address | str
    ) -> None:
        header = _NDMSG.pack(socket.AF_BRIDGE, ifindex, NUD_NOARP | NUD_PERMANENT, NTF_SELF, 0)
        body = header + _mac(NDA_LLADDR, lladdr) + _ipv4(NDA_DST, dst)
        self._request(kind, NLM_F_REQUEST | NLM_F_ACK | flags, body)

    # The exchange.

    def send(self, request: Request) -> None:
        """Sends ``request`` and waits for its acknowledgement; its error (NetlinkError) unless
        tolerated."""
        try:
            self._request(request.kind, request.flags | NLM_F_ACK, request.body)
        except NetlinkError as exc:
            if exc.errno not in request.tolerated:
                raise

    def send_together(self, requests: Sequence[Request]) -> list[Link | None]:
        """Sends ``requests`` in one message, which the kernel carries out in order, each
        whatever became of the ones before; once the kernel has carried out all of them, raises
        RequestFailed if some failed with an error that their request does not tolerate. One
        round trip instead of one per request: only the last asks for an acknowledgement, and
        the kernel answers the others only when they fail, so the last's answer comes after
        every failure's and every echo's. Returns, for each request, the link the kernel echoed
        for it (a request with NLM_F_ECHO that made one), else None."""
        by_seq: dict[int, int] = {}
        data = b""
        for position, request in enumerate(requests):
            self._seq = self._seq % 0xFFFFFFFF + 1
            flags = request.flags | (NLM_F_ACK if position == len(requests) - 1 else 0)
            data += message(request.kind, flags, self._seq, request.body)
            by_seq[self._seq] = position
        echoed: list[Link | None] = [None] * len(requests)
        if not by_seq:
            return echoed
        last = self._seq
        self._sock.send(data)
        failures: dict[int, NetlinkError] = {}
        while True:
            for msg_type, msg_flags, msg_seq, payload in parse_messages(
                self._sock.recv(_RECEIVE_SIZE)
            ):
                answered = by_seq.get(msg_seq)
                if answered is None:
                    # The rest of an earlier request's answer that its caller stopped reading.
                    continue
                if msg_type == RTM_NEWLINK:
                    echoed[answered] = decode_link(payload)
                    continue
                if msg_type != NLMSG_ERROR:
                    continue
                error = decode_error(msg_flags, payload)
                if error is not None and error.errno not in requests[answered].tolerated:
                    failures[answered] = error
                if msg_seq == last:
                    if failures:
                        raise RequestFailed(failures)
                    return echoed

    def _dump(self, kind: int, body: bytes, reply: int) -> list[bytes]:
        for _ in range(_DUMP_ATTEMPTS):
            try:
                return self._request(kind, NLM_F_REQUEST | NLM_F_DUMP, body, reply)
            except _DumpInterrupted:
                continue
        raise NetlinkError(errno.EAGAIN, f"the dump of {kind} kept changing while it was read")

    def _request(self, kind: int, flags: int, body: bytes, reply: int = 0) -> list[bytes]:
        """Sends a request and returns the payloads of its replies of type ``reply``, once the
        kernel has answered it whole: an ACK, the object asked for, or a dump's NLMSG_DONE."""
        self._seq = self._seq % 0xFFFFFFFF + 1
        seq = self._seq
        self._sock.send(message(kind, flags, seq, body))
        payloads: list[bytes] = []
        interrupted = False
        while True:
            for msg_type, msg_flags, msg_seq, payload in parse_messages(
                self._sock.recv(_RECEIVE_SIZE)
            ):
                if msg_seq != seq:
                    # The rest of an earlier request's answer that its caller stopped reading.
                    continue
                if msg_type in (NLMSG_ERROR, NLMSG_DONE):
                    error = decode_error(msg_flags, payload)
                    if error is not None:
                        raise error
                    if interrupted:
                        raise _DumpInterrupted()
                    return payloads
                interrupted = interrupted or bool(msg_flags & NLM_F_DUMP_INTR)
                if msg_type == reply:
                    payloads.append(payload)
                if not msg_flags & NLM_F_MULTI and not flags & NLM_F_ACK:
                    # The one answer to a plain get.
                    return payloads


class SocketPool:
    """Rtnetlink clients of this process's netns for several threads: each caller borrows one
    for the time of its calls, and it is kept for the next caller.

    One socket per concurrent caller rather than one behind a lock: the kernel holds a request
    for as long as it works on it (deleting a veth takes 15-20 ms), and a lock would make every
    other thread wait that long.
    """

    def __init__(self) -> None:
        self._idle: list[Rtnetlink] = []
        self._guard = threading.Lock()

    @contextmanager
    def client(self) -> Iterator[Rtnetlink]:
        with self._guard:
            nl = self._idle.pop() if self._idle else None
        if nl is None:
            nl = Rtnetlink()
        try:
            yield nl
        finally:
            with self._guard:
                self._idle.append(nl)

    def close(self) -> None:
        """Closes the idle sockets; the pool stays usable (it opens new ones)."""
        with self._guard:
            idle, self._idle = self._idle, []
        for nl in idle:
            nl.close()


def open_in_netns(netns_fd: int) -> Rtnetlink:
    """An rtnetlink client whose socket lives in the netns of ``netns_fd``.

    A socket stays in the netns it was created in, and setns() of a network namespace moves only
    the calling thread. So this thread enters the netns, creates the socket and comes back to
    this process's netns (about 25 us; a short-lived thread for it cost 0.15 ms of each ADD).
    Should it fail to come back, it is stranded: it raises, and creates no socket any more (one
    would land in the pod's netns), so that nothing of it acts on the wrong netns.
    """
    home = _process_netns()
    _ensure_home()
    try:
        _setns(netns_fd)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot enter the netns: {exc.strerror}") from None
    try:
        sock = _new_route_socket()
    except BaseException:
        _come_back(home)
        raise
    try:
        _come_back(home)
    except BaseException:
        sock.close()
        raise
    return Rtnetlink(sock)


_process_netns_guard = threading.Lock()
_process_netns_fd: int | None = None


def _process_netns() -> int:
    """An fd of this process's netns, where its threads come back to: opened once, kept open."""
    global _process_netns_fd
    with _process_netns_guard:
        if _process_netns_fd is None:
            _process_netns_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        return _process_netns_fd


# Per thread: whether it is stuck in another netns (open_in_netns could not bring it back).
_stranded = threading.local()


def _come_back(home: int) -> None:
    """Takes the calling thread back to the netns ``home``; strands it if that fails."""
    try:
        _setns(home)
    except OSError as exc:
        _stranded.netns = True
        raise RuntimeError(
            f"thread {threading.current_thread().name} cannot return to its netns after "
            f"opening a socket in another: {exc.strerror}"
        ) from exc


def _setns(netns_fd: int) -> None:
    if _libc.setns(netns_fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _ensure_home() -> None:
    if getattr(_stranded, "netns", False):
        raise RuntimeError(
            f"thread {threading.current_thread().name} is stuck in another netns: it opens no "
            "netlink socket"
        )
