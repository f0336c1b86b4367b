"""Networks, subnets and ports: a capsule's place on a network."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Network:
    id: str
    name: str
    project_id: str
    shared: bool
    # The network every capsule joins until tenant networks land.
    is_default: bool
    mtu: int


@dataclass(frozen=True)
class Subnet:
    id: str
    network_id: str
    project_id: str
    cidr: ipaddress.IPv4Network
    gateway_ip: ipaddress.IPv4Address

    def allocatable(self) -> range:
        """Integer addresses a port may get: the subnet's hosts, except the gateway."""
        return range(int(self.cidr.network_address) + 1, int(self.cidr.broadcast_address))


@dataclass(frozen=True)
class Port:
    id: str
    network_id: str
    subnet_id: str
    project_id: str
    ip_address: ipaddress.IPv4Address
    mac_address: str
    # The capsule (or container) that owns the port.
    device_id: str
    device_owner: str
    status: str
    host: str | None
    # What the CNI daemon bound: the sandbox's CNI container id and the host side veth.
    binding_container_id: str | None
    binding_host_ifname: str | None
    created_at: datetime | None
