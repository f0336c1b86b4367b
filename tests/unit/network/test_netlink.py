"""capsa's rtnetlink client without the kernel: messages and attributes as bytes, and the exchange
over a datagram socket pair whose other end plays the kernel's part.
tests/integration/test_netlink.py runs every request against the real kernel."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest

from capsa.network import netlink
from capsa.network.netlink import (
    IFLA_ADDRESS,
    IFLA_IFALIAS,
    IFLA_IFNAME,
    IFLA_INFO_DATA,
    IFLA_INFO_KIND,
    IFLA_LINK,
    IFLA_LINKINFO,
    IFLA_MASTER,
    IFLA_MTU,
    IFLA_NET_NS_FD,
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_ACK_TLVS,
    NLM_F_CAPPED,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_ECHO,
    NLM_F_EXCL,
    NLM_F_MULTI,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGERR_ATTR_MSG,
    RTM_GETLINK,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    RTM_SETLINK,
    VETH_INFO_PEER,
    Rtnetlink,
    attribute,
    message,
    nested,
    parse_attributes,
    parse_messages,
)

IFINFOMSG = struct.Struct("=BxHiII")


def link_payload(index: int, name: str, flags: int = 0, *extra: bytes) -> bytes:
    return (
        IFINFOMSG.pack(0, 1, index, flags, 0)
        + attribute(IFLA_IFNAME, name.encode() + b"\0")
        + b"".join(extra)
    )


def error_payload(code: int, request: bytes = bytes(16)) -> bytes:
    return struct.pack("=i", -code) + request


class Kernel:
    """The other end of the client's socket: it reads requests and sends replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def reply(self, *messages: bytes) -> None:
        """One datagram holding ``messages``, as the kernel packs a dump's."""
        self.sock.send(b"".join(messages))

    def request(self) -> tuple[int, int, int, bytes]:
        (only,) = parse_messages(self.sock.recv(65536))
        return only


@pytest.fixture
def pair() -> Iterator[tuple[Rtnetlink, Kernel]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    client = Rtnetlink(ours)
    try:
        yield client, Kernel(theirs)
    finally:
        client.close()
        theirs.close()


def test_attributes_are_padded_to_four_bytes() -> None:
    encoded = attribute(IFLA_IFNAME, b"eth0\0")
    # 4 bytes of header, 5 of payload, 3 of padding; the length counts no padding.
    assert encoded == struct.pack("=HH", 9, IFLA_IFNAME) + b"eth0\0" + bytes(3)
    assert len(attribute(IFLA_MTU, struct.pack("=I", 1500))) == 8


def test_attributes_parse_back_across_padding() -> None:
    data = (
        attribute(IFLA_IFNAME, b"a\0")
        + attribute(IFLA_ADDRESS, bytes.fromhex("020000000001"))
        + attribute(IFLA_MTU, struct.pack("=I", 1400))
    )
    assert parse_attributes(data) == {
        IFLA_IFNAME: b"a\0",
        IFLA_ADDRESS: bytes.fromhex("020000000001"),
        IFLA_MTU: struct.pack("=I", 1400),
    }


def test_nested_attributes_carry_the_nested_flag_and_parse_inside() -> None:
    encoded = nested(IFLA_LINKINFO, attribute(IFLA_INFO_KIND, b"veth\0"))
    length, kind = struct.unpack_from("=HH", encoded)
    assert kind == IFLA_LINKINFO | NLA_F_NESTED
    assert length == len(encoded) == 4 + 12
    outer = parse_attributes(encoded)
    assert parse_attributes(outer[IFLA_LINKINFO]) == {IFLA_INFO_KIND: b"veth\0"}


def test_a_truncated_attribute_is_refused() -> None:
    data = attribute(IFLA_IFNAME, b"eth0\0")[:7]
    with pytest.raises(netlink.NetlinkError) as caught:
        parse_attributes(data)
    assert caught.value.errno == errno.EBADMSG


def test_messages_of_one_datagram_split_on_aligned_lengths() -> None:
    first = message(RTM_NEWLINK, NLM_F_MULTI, 7, b"abcde")
    second = message(NLMSG_DONE, NLM_F_MULTI, 7, struct.pack("=i", 0))
    assert len(first) == 21
    data = first + bytes(3) + second
    assert list(parse_messages(data)) == [
        (RTM_NEWLINK, NLM_F_MULTI, 7, b"abcde"),
        (NLMSG_DONE, NLM_F_MULTI, 7, struct.pack("=i", 0)),
    ]


def test_a_message_longer_than_its_datagram_is_refused() -> None:
    with pytest.raises(netlink.NetlinkError):
        list(parse_messages(message(RTM_NEWLINK, 0, 1, bytes(40))[:30]))


def test_link_decodes_its_attributes() -> None:
    vxlan_data = nested(IFLA_INFO_DATA, attribute(1, struct.pack("=I", 4242)))
    payload = link_payload(
        12,
        "cvx-net",
        netlink.IFF_UP,
        attribute(IFLA_ADDRESS, bytes.fromhex("02aabbccddee")),
        attribute(IFLA_MTU, struct.pack("=I", 1450)),
        attribute(IFLA_MASTER, struct.pack("=I", 3)),
        attribute(IFLA_IFALIAS, b"capsa-cni o p c"),
        nested(IFLA_LINKINFO, attribute(IFLA_INFO_KIND, b"vxlan\0"), vxlan_data),
    )
    link = netlink.decode_link(payload)
    assert link == netlink.Link(
        index=12,
        ifname="cvx-net",
        flags=netlink.IFF_UP,
        address="02:aa:bb:cc:dd:ee",
        mtu=1450,
        master=3,
        ifalias="capsa-cni o p c",
        kind="vxlan",
        vxlan_id=4242,
    )
    assert link.up


def test_a_bridge_port_says_whether_it_is_locked() -> None:
    def port(*settings: bytes) -> netlink.Link:
        slave_data = nested(netlink.IFLA_INFO_SLAVE_DATA, *settings)
        return netlink.decode_link(link_payload(9, "capsa-x", 0, nested(IFLA_LINKINFO, slave_data)))

    flooding = attribute(netlink.IFLA_BRPORT_UNICAST_FLOOD, b"\x01")
    assert port(flooding, attribute(netlink.IFLA_BRPORT_LOCKED, b"\x01")).port_locked
    assert not port(attribute(netlink.IFLA_BRPORT_LOCKED, b"\x00"), flooding).port_locked
    # A kernel without the setting, and a link on no bridge.
    assert not port(flooding).port_locked
    assert not netlink.decode_link(link_payload(9, "capsa-x")).port_locked


@pytest.mark.parametrize("locked", [True, False])
def test_a_bridge_port_request_locks_or_unlocks_it_in_one_request(
    pair: tuple[Rtnetlink, Kernel], locked: bool
) -> None:
    client, kernel = pair
    kernel.reply(message(NLMSG_ERROR, NLM_F_CAPPED, 1, error_payload(0)))

    client.send(netlink.bridge_port_request(6, locked=locked))

    kind, _, _, body = kernel.request()
    family, _, index, ifi_flags, change = IFINFOMSG.unpack_from(body)
    # The bridge's own request: the link's flags untouched.
    assert (kind, family, index, ifi_flags, change) == (RTM_SETLINK, socket.AF_BRIDGE, 6, 0, 0)
    settings = parse_attributes(parse_attributes(body, IFINFOMSG.size)[netlink.IFLA_PROTINFO])
    floods = (
        netlink.IFLA_BRPORT_UNICAST_FLOOD,
        netlink.IFLA_BRPORT_MCAST_FLOOD,
        netlink.IFLA_BRPORT_BCAST_FLOOD,
    )
    assert settings[netlink.IFLA_BRPORT_LOCKED] == bytes([locked])
    assert [settings[flood] for flood in floods] == [bytes([not locked])] * 3
    # Locking forgets the MACs learnt on the port, so that nothing is forwarded to it.
    assert (netlink.IFLA_BRPORT_FLUSH in settings) == locked


def test_a_link_without_master_or_alias_has_none() -> None:
    link = netlink.decode_link(link_payload(5, "capsa0"))
    assert (link.master, link.ifalias, link.kind, link.up) == (None, None, None, False)


def test_a_get_returns_the_one_reply(pair: tuple[Rtnetlink, Kernel]) -> None:
    client, kernel = pair
    kernel.reply(message(RTM_NEWLINK, 0, 1, link_payload(4, "eth0")))
    assert client.get_link(name="eth0").index == 4
    kind, flags, seq, body = kernel.request()
    assert (kind, flags, seq) == (RTM_GETLINK, NLM_F_REQUEST, 1)
    assert parse_attributes(body, IFINFOMSG.size)[IFLA_IFNAME] == b"eth0\0"


def test_a_dump_gathers_every_part_until_done(pair: tuple[Rtnetlink, Kernel]) -> None:
    client, kernel = pair
    kernel.reply(
        message(RTM_NEWLINK, NLM_F_MULTI, 1, link_payload(1, "lo")),
        message(RTM_NEWLINK, NLM_F_MULTI, 1, link_payload(2, "eth0")),
    )
    kernel.reply(message(RTM_NEWLINK, NLM_F_MULTI, 1, link_payload(3, "capsa0")))
    kernel.reply(message(NLMSG_DONE, NLM_F_MULTI, 1, struct.pack("=i", 0)))
    assert [link.ifname for link in client.links(master=3)] == ["lo", "eth0", "capsa0"]
    kind, flags, _, body = kernel.request()
    assert (kind, flags) == (RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP)
    assert parse_attributes(body, IFINFOMSG.size)[IFLA_MASTER] == struct.pack("=I", 3)


def test_an_interrupted_dump_is_asked_again(pair: tuple[Rtnetlink, Kernel]) -> None:
    client, kernel = pair
    kernel.reply(
        message(RTM_NEWLINK, NLM_F_MULTI | NLM_F_DUMP_INTR, 1, link_payload(1, "lo")),
        message(NLMSG_DONE, NLM_F_MULTI | NLM_F_DUMP_INTR, 1, struct.pack("=i", 0)),
    )
    kernel.reply(
        message(RTM_NEWLINK, NLM_F_MULTI, 2, link_payload(1, "lo")),
        message(RTM_NEWLINK, NLM_F_MULTI, 2, link_payload(2, "eth0")),
        message(NLMSG_DONE, NLM_F_MULTI, 2, struct.pack("=i", 0)),
    )
    assert [link.ifname for link in client.links()] == ["lo", "eth0"]
    assert [kernel.request()[2], kernel.request()[2]] == [1, 2]


def test_a_dump_that_fails_midway_raises_its_errno(pair: tuple[Rtnetlink, Kernel]) -> None:
    client, kernel = pair
    kernel.reply(
        message(RTM_NEWLINK, NLM_F_MULTI, 1, link_payload(1, "lo")),
        message(NLMSG_DONE, NLM_F_MULTI, 1, struct.pack("=i", -errno.EINVAL)),
    )
    with pytest.raises(netlink.NetlinkError) as caught:
        client.links()
    assert caught.value.errno == errno.EINVAL


def test_an_error_carries_its_errno(pair: tuple[Rtnetlink, Kernel]) -> None:
    client, kernel = pair
    kernel.reply(message(NLMSG_ERROR, 0, 1, error_payload(errno.EEXIST)))
    with pytest.raises(netlink.NetlinkError) as caught:
        client.add_bridge("capsa0", mtu=1500)
    assert caught.value.errno == errno.EEXIST
    assert isinstance(caught.value, OSError)
    kind, flags, _, _ = kernel.request()
    assert (kind, flags) == (RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)


def test_an_error_carries_the_kernels_message(pair: tuple[Rtnetlink, Kernel]) -> None:
    client, kernel = pair
    capped_request = message(RTM_NEWLINK, NLM_F_REQUEST, 1, b"")
    extended = attribute(NLMSGERR_ATTR_MSG, b"VXLAN ID must be lower than 16777216\0")
    kernel.reply(
        message(
            NLMSG_ERROR,
            NLM_F_CAPPED | NLM_F_ACK_TLVS,
            1,
            error_payload(errno.ERANGE, capped_request) + extended,
        )
    )
    with pytest.raises(netlink.NetlinkError) as caught:
        client.add_vxlan("cvx-a", vni=1 << 24, local="192.0.2.1", port=4789, mtu=1450)
    assert caught.value.errno == errno.ERANGE
    assert "VXLAN ID must be lower than 16777216" in str(caught.value)


def test_an_ack_ends_a_request(pair: tuple[Rtnetlink, Kernel]) -> None:
    client, kernel = pair
    kernel.reply(message(NLMSG_ERROR, NLM_F_CAPPED, 1, error_payload(0)))
    client.send(netlink.link_request(index=7, master=0, up=False, alias="capsa-cni x"))
    kind, flags, _, body = kernel.request()
    assert (kind, flags) == (RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK)
    _, _, index, ifi_flags, change = IFINFOMSG.unpack_from(body)
    # Down: the flag cleared, and named as the one to change.
    assert (index, ifi_flags, change) == (7, 0, netlink.IFF_UP)
    attributes = parse_attributes(body, IFINFOMSG.size)
    assert attributes[IFLA_MASTER] == struct.pack("=I", 0)
    # No NUL: the kernel would count it in the alias's 255 bytes.
    assert attributes[IFLA_IFALIAS] == b"capsa-cni x"


def test_replies_to_an_earlier_request_are_skipped(pair: tuple[Rtnetlink, Kernel]) -> None:
    client, kernel = pair
    kernel.reply(message(NLMSG_ERROR, 0, 1, error_payload(errno.ENODEV)))
    with pytest.raises(netlink.NetlinkError):
        client.get_link(index=9)
    # What is left of a request that its caller gave up reading, then the answer to this one.
    kernel.reply(message(RTM_NEWLINK, NLM_F_MULTI, 1, link_payload(9, "stale")))
    kernel.reply(message(RTM_NEWLINK, 0, 2, link_payload(2, "eth0")))
    assert client.get_link(index=2).ifname == "eth0"


def test_a_veth_is_one_request_with_its_peer_nested(pair: tuple[Rtnetlink, Kernel]) -> None:
    client, kernel = pair
    kernel.reply(message(NLMSG_ERROR, NLM_F_CAPPED, 1, error_payload(0)))
    (echoed,) = client.send_together(
        [
            netlink.veth_request(
                "capsa123",
                peer="eth0",
                peer_netns_fd=5,
                peer_address="02:00:00:00:00:02",
                peer_mtu=1400,
                address="02:00:00:00:00:01",
                mtu=1400,
                master=3,
                up=True,
            )
        ]
    )
    # A kernel that does not echo the new link: its peer's index is not known.
    assert echoed is None
    _, flags, _, body = kernel.request()
    assert flags & NLM_F_ECHO
    _, _, _, ifi_flags, change = IFINFOMSG.unpack_from(body)
    assert (ifi_flags, change) == (netlink.IFF_UP, netlink.IFF_UP)
    host = parse_attributes(body, IFINFOMSG.size)
    assert host[IFLA_IFNAME] == b"capsa123\0"
    assert host[IFLA_MASTER] == struct.pack("=I", 3)
    linkinfo = parse_attributes(host[IFLA_LINKINFO])
    assert linkinfo[IFLA_INFO_KIND] == b"veth\0"
    peer = parse_attributes(linkinfo[IFLA_INFO_DATA])[VETH_INFO_PEER]
    # VETH_INFO_PEER starts with the peer's own ifinfomsg, then its attributes.
    assert IFINFOMSG.unpack_from(peer) == (0, 0, 0, 0, 0)
    assert parse_attributes(peer, IFINFOMSG.size) == {
        IFLA_IFNAME: b"eth0\0",
        IFLA_ADDRESS: bytes.fromhex("020000000002"),
        IFLA_MTU: struct.pack("=I", 1400),
        IFLA_NET_NS_FD: struct.pack("=I", 5),
    }


def test_a_veth_whose_creation_the_kernel_echoes_gives_its_peers_index(
    pair: tuple[Rtnetlink, Kernel],
) -> None:
    client, kernel = pair
    # The echo of the new host end (its peer is index 2 in the pod's netns), then the ACK.
    echo = link_payload(14, "capsa123", 0, attribute(IFLA_LINK, struct.pack("=i", 2)))
    kernel.reply(
        message(RTM_NEWLINK, 0, 1, echo), message(NLMSG_ERROR, NLM_F_CAPPED, 1, error_payload(0))
    )
    (echoed,) = client.send_together(
        [netlink.veth_request("capsa123", peer="eth0", peer_netns_fd=5)]
    )
    assert echoed is not None and (echoed.index, echoed.link) == (14, 2)


def test_a_default_route_dump_keeps_prefix_length_zero(pair: tuple[Rtnetlink, Kernel]) -> None:
    client, kernel = pair
    rtmsg = struct.Struct("=BBBBBBBBI")

    def route(dst_len: int, *attributes: bytes) -> bytes:
        header = rtmsg.pack(socket.AF_INET, dst_len, 0, 0, 254, 4, 0, 1, 0)
        return message(RTM_NEWROUTE, NLM_F_MULTI, 1, header + b"".join(attributes))

    kernel.reply(
        route(0, attribute(5, IPv4Address("10.0.0.1").packed), attribute(4, b"\2\0\0\0")),
        route(24, attribute(1, IPv4Address("10.0.0.0").packed), attribute(4, b"\2\0\0\0")),
        message(NLMSG_DONE, NLM_F_MULTI, 1, struct.pack("=i", 0)),
    )
    (default,) = client.routes(socket.AF_INET, dst_len=0)
    assert default == netlink.Route(
        family=socket.AF_INET, dst_len=0, table=254, dst=None, gateway="10.0.0.1", oif=2
    )


def test_an_address_request_names_its_link_and_prefix(pair: tuple[Rtnetlink, Kernel]) -> None:
    client, kernel = pair
    kernel.reply(message(NLMSG_ERROR, NLM_F_CAPPED, 1, error_payload(0)))
    client.send(netlink.address_request(6, IPv4Interface("10.217.3.4/16")))
    _, _, _, body = kernel.request()
    family, prefixlen, _, _, index = struct.unpack_from("=BBBBI", body)
    assert (family, prefixlen, index) == (socket.AF_INET, 16, 6)
    assert set(parse_attributes(body, 8).values()) == {IPv4Address("10.217.3.4").packed}


def test_a_link_is_named_by_name_or_index_not_both(pair: tuple[Rtnetlink, Kernel]) -> None:
    client, _ = pair
    with pytest.raises(ValueError):
        client.delete_link(name="a", index=2)
    with pytest.raises(ValueError):
        client.get_link()


def test_the_pool_lends_one_client_per_caller_and_keeps_them() -> None:
    # Real sockets of this netns: reading links needs no privilege.
    pool = netlink.SocketPool()
    try:
        with pool.client() as first, pool.client() as second:
            assert first is not second
            assert first.get_link(index=1).ifname == second.get_link(index=1).ifname
        with pool.client() as again:
            assert again in (first, second)
    finally:
        pool.close()
    with pytest.raises(OSError):
        first.get_link(index=1)
    with pool.client() as fresh:
        assert fresh not in (first, second)
        assert fresh.get_link(index=1).index == 1
    pool.close()


def test_only_the_wanted_attributes_are_kept() -> None:
    data = attribute(IFLA_IFNAME, b"a\0") + nested(IFLA_LINKINFO, attribute(IFLA_INFO_KIND, b"x"))
    assert parse_attributes(data, 0, frozenset({IFLA_LINKINFO})).keys() == {IFLA_LINKINFO}


def test_a_file_that_is_no_netns_cannot_be_entered(tmp_path: Path) -> None:
    path = tmp_path / "not-a-netns"
    path.write_text("")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="cannot enter the netns"):
            netlink.open_in_netns(fd)
    finally:
        os.close(fd)


def test_requests_sent_together_go_in_one_datagram_and_only_the_last_asks_for_an_ack(
    pair: tuple[Rtnetlink, Kernel],
) -> None:
    client, kernel = pair
    steps = [
        netlink.address_request(3, IPv4Interface("10.0.0.2/24")).tolerating(errno.EEXIST),
        netlink.link_request(index=3, up=True),
        netlink.default_route_request(IPv4Address("10.0.0.1"), 3),
    ]
    # The kernel's answers: the address exists (tolerated), the route's ACK. A leftover of an
    # earlier request (sequence 99) is skipped.
    kernel.reply(message(NLMSG_ERROR, 0, 99, error_payload(errno.EPERM)))
    kernel.reply(message(NLMSG_ERROR, 0, 1, error_payload(errno.EEXIST)))
    kernel.reply(message(NLMSG_ERROR, NLM_F_CAPPED, 3, error_payload(0)))
    # Nothing asked for an echo: nothing echoed.
    assert client.send_together(steps) == [None, None, None]
    sent = list(parse_messages(kernel.sock.recv(65536)))
    assert [(kind, flags & NLM_F_ACK, seq) for kind, flags, seq, _ in sent] == [
        (netlink.RTM_NEWADDR, 0, 1),
        (RTM_SETLINK, 0, 2),
        (netlink.RTM_NEWROUTE, NLM_F_ACK, 3),
    ]


def test_the_untolerated_failures_of_requests_sent_together_are_raised_after_the_last(
    pair: tuple[Rtnetlink, Kernel],
) -> None:
    client, kernel = pair
    kernel.reply(message(NLMSG_ERROR, 0, 1, error_payload(errno.ENODEV)))
    kernel.reply(message(NLMSG_ERROR, 0, 2, error_payload(errno.EINVAL)))
    kernel.reply(message(NLMSG_ERROR, NLM_F_CAPPED, 3, error_payload(0)))
    # A later request's answer, still queued, would be read as this one's if the last ACK did
    # not end the call.
    kernel.reply(message(NLMSG_ERROR, NLM_F_CAPPED, 4, error_payload(errno.EBUSY)))
    with pytest.raises(netlink.RequestFailed) as caught:
        client.send_together([netlink.link_request(index=n, up=True) for n in (1, 2, 3)])
    assert (caught.value.errno, min(caught.value.failures)) == (errno.ENODEV, 0)
    # Every failure is told, by position: the third request succeeded.
    assert {n: e.errno for n, e in caught.value.failures.items()} == {
        0: errno.ENODEV,
        1: errno.EINVAL,
    }
    with pytest.raises(netlink.NetlinkError) as later:
        client.send(netlink.link_request(index=4, up=True))
    assert later.value.errno == errno.EBUSY
