"""Address and MAC choice for new ports (the store makes the choice and the insert atomic)."""

from __future__ import annotations

import secrets

from capsa.model.network import Subnet

# Neutron's prefix: locally administered, unicast, recognisable in `ip link`.
MAC_PREFIX = "fa:16:3e"


def lowest_free_address(subnet: Subnet, used: set[int]) -> int | None:
    """The lowest address of the subnet's allocation pools not in ``used``, never the gateway."""
    gateway = int(subnet.gateway_ip)
    for pool in subnet.pools():
        for address in range(int(pool.start), int(pool.end) + 1):
            if address != gateway and address not in used:
                return address
    return None


def random_mac() -> str:
    tail = secrets.token_bytes(3)
    return MAC_PREFIX + "".join(f":{b:02x}" for b in tail)
