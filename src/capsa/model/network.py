"""Tenant networks: networks, subnets, ports, security groups and their rules.

Each is owned by a project. A network an admin made ``shared`` is usable by every project. A
project gets its own default network and default security group the first time one of its
capsules needs them.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from datetime import datetime

# Annotations of a capsule (Zun template or Pod manifest) that choose where it is attached:
# networks by name or id, and security groups by name or id, each comma-separated. Without them a
# capsule joins its project's default network and default security group.
NETWORK_ANNOTATION = "capsa.io/network"
SECURITY_GROUPS_ANNOTATION = "capsa.io/security-groups"
# The most networks one capsule joins: each is an interface in its pod (eth0, eth1, ...).
MAX_CAPSULE_NETWORKS = 8


@dataclass(frozen=True)
class Attachment:
    """Where a capsule asked to be attached; () means its project's default network, or group.

    The capsule gets a port on each network, in this order: the first is its pod's first
    interface, with the default route; every port is in all the groups.
    """

    networks: tuple[str, ...] = ()
    security_groups: tuple[str, ...] = ()

    @classmethod
    def from_annotations(cls, annotations: dict[str, str]) -> Attachment:
        return cls(
            _comma_separated(annotations.get(NETWORK_ANNOTATION, "")),
            _comma_separated(annotations.get(SECURITY_GROUPS_ANNOTATION, "")),
        )


def _comma_separated(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


@dataclass(frozen=True)
class Network:
    id: str
    name: str
    project_id: str
    shared: bool
    # The project's default network: capsules that name none join it.
    is_default: bool
    mtu: int
    # The VXLAN network identifier of the network's overlay between hosts (one per network).
    segmentation_id: int = 0
    admin_state_up: bool = True
    description: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True)
class AllocationPool:
    start: ipaddress.IPv4Address
    end: ipaddress.IPv4Address

    def __contains__(self, address: object) -> bool:
        return isinstance(address, ipaddress.IPv4Address) and self.start <= address <= self.end


@dataclass(frozen=True)
class Subnet:
    id: str
    network_id: str
    project_id: str
    cidr: ipaddress.IPv4Network
    gateway_ip: ipaddress.IPv4Address
    name: str = ""
    # Where ports get their addresses; empty means every host address but the gateway.
    allocation_pools: tuple[AllocationPool, ...] = ()
    dns_nameservers: tuple[str, ...] = ()
    enable_dhcp: bool = True
    description: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def pools(self) -> tuple[AllocationPool, ...]:
        """The allocation pools, the default one when none was given."""
        if self.allocation_pools:
            return self.allocation_pools
        return default_pools(self.cidr, self.gateway_ip)


def default_pools(
    cidr: ipaddress.IPv4Network, gateway: ipaddress.IPv4Address
) -> tuple[AllocationPool, ...]:
    """Every host address of ``cidr`` but ``gateway``, as Neutron chooses them."""
    first = cidr.network_address + 1
    last = cidr.broadcast_address - 1
    if first > last:
        return ()
    if not first <= gateway <= last:
        return (AllocationPool(first, last),)
    pools = []
    if first < gateway:
        pools.append(AllocationPool(first, gateway - 1))
    if gateway < last:
        pools.append(AllocationPool(gateway + 1, last))
    return tuple(pools)


# The device_owner of the ports capsa allocates for capsules (and single containers): only
# these are a capsule's, whatever another port's device_id says.
DEVICE_OWNER_CAPSULE = "compute:capsule"


@dataclass(frozen=True)
class Port:
    id: str
    network_id: str
    subnet_id: str
    project_id: str
    ip_address: ipaddress.IPv4Address
    mac_address: str
    # The capsule (or container) that owns the port; "" for a port made through the API alone.
    device_id: str
    device_owner: str
    status: str
    host: str | None
    # What the CNI daemon bound: the sandbox's CNI container id and the host side veth.
    binding_container_id: str | None
    binding_host_ifname: str | None
    created_at: datetime | None
    name: str = ""
    admin_state_up: bool = True
    security_group_ids: tuple[str, ...] = ()
    description: str = ""
    updated_at: datetime | None = None
    # Its place among its capsule's ports: 0 is the pod's first interface, 1 the next...
    interface_index: int = 0


@dataclass(frozen=True)
class PortToBind:
    """A capsule's port as the CNI daemon reads it for every ADD: what its pod end and bridge
    need, and its current binding. Nothing else, since a sandbox's start waits for this read."""

    id: str
    network_id: str
    mac_address: str
    # The port's address with its subnet's prefix length.
    ip_interface: ipaddress.IPv4Interface
    gateway_ip: ipaddress.IPv4Address
    mtu: int
    binding_container_id: str | None
    binding_host_ifname: str | None


class Direction(enum.StrEnum):
    INGRESS = "ingress"
    EGRESS = "egress"


class EtherType(enum.StrEnum):
    IPV4 = "IPv4"
    IPV6 = "IPv6"


# Protocols a rule may name, as Neutron spells them; a rule may also give an IP protocol number.
PROTOCOL_NUMBERS = {"icmp": 1, "tcp": 6, "udp": 17, "sctp": 132, "ipv6-icmp": 58, "icmpv6": 58}
# Protocols whose rules may carry a port range.
PORT_PROTOCOLS = frozenset({"tcp", "udp", "sctp", "6", "17", "132"})
# Protocols whose rules may carry an ICMP type (port_range_min) and code (port_range_max).
ICMP_PROTOCOLS = frozenset({"icmp", "1", "ipv6-icmp", "icmpv6", "58"})


@dataclass(frozen=True)
class SecurityGroupRule:
    id: str
    security_group_id: str
    project_id: str
    direction: Direction
    ethertype: EtherType
    # A name of PROTOCOL_NUMBERS, a number as a string, or None for any protocol.
    protocol: str | None = None
    # A port range for tcp/udp/sctp; for icmp, min is the type and max the code.
    port_range_min: int | None = None
    port_range_max: int | None = None
    remote_ip_prefix: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    remote_group_id: str | None = None
    description: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True)
class SecurityGroup:
    id: str
    name: str
    project_id: str
    description: str = ""
    # The project's default group: what a capsule that names none joins.
    is_default: bool = False
    rules: tuple[SecurityGroupRule, ...] = field(default=())
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True)
class LocalPort:
    """A port bound (or to be bound) on this host, with what its firewall and bridge need."""

    port: Port
    network: Network
    subnet: Subnet


@dataclass(frozen=True)
class RemotePort:
    """A port of another host, on a network this host has ports on: where the overlay sends
    frames for its MAC."""

    network_id: str
    host: str
    tunnel_ip: str
    mac_address: str


@dataclass(frozen=True)
class HostPortMapping:
    """A container port published on the host: ``host_port`` on every local address, to the
    capsule's first port."""

    port_id: str
    host_port: int
    container_port: int
    protocol: str  # tcp, udp or sctp


@dataclass(frozen=True)
class HostNetworkView:
    """What a host's network agent enforces, read in one transaction."""

    ports: tuple[LocalPort, ...]
    # Rules of the groups the local ports are in, by group id.
    rules: dict[str, tuple[SecurityGroupRule, ...]]
    # For each group that a rule names as remote: its members' (network id, address).
    members: dict[str, tuple[tuple[str, ipaddress.IPv4Address], ...]]
    remote_ports: tuple[RemotePort, ...]
    # The host ports of the capsules that should run here.
    host_ports: tuple[HostPortMapping, ...] = ()
