"""capsa's network service: a capsule's port on the default network, made before its sandbox.

It is also where the CNI daemon learns what to bind (:class:`capsa.network.types.PortSource`).
"""

from __future__ import annotations

import ipaddress
import uuid as uuidlib

from capsa.log import get_logger
from capsa.model.network import Network, Port, Subnet
from capsa.network.ipam import lowest_free_address, random_mac
from capsa.network.types import PortBinding
from capsa.store import Store

log = get_logger(__name__)

DEVICE_OWNER_CAPSULE = "compute:capsule"


class NetworkService:
    def __init__(self, store: Store, default_cidr: str, mtu: int, owner_project_id: str) -> None:
        self._store = store
        self._default_cidr = ipaddress.IPv4Network(default_cidr)
        self._mtu = mtu
        self._owner_project_id = owner_project_id
        self._default: tuple[Network, Subnet] | None = None

    async def default_network(self) -> tuple[Network, Subnet]:
        if self._default is None:
            network, subnet = await self._store.ports.ensure_default_network(
                self._owner_project_id, self._default_cidr, self._mtu
            )
            if subnet.cidr != self._default_cidr:
                log.warning(
                    "default network keeps its subnet; the configured one applies to new databases",
                    network=network.id,
                    subnet=str(subnet.cidr),
                    configured=str(self._default_cidr),
                )
            self._default = (network, subnet)
        return self._default

    async def allocate_port(self, device_id: str, project_id: str, host: str) -> Port:
        """The device's port, created on first call; later calls return the same port."""
        existing = await self._store.ports.find_by_device(device_id)
        if existing is not None:
            return existing
        _, subnet = await self.default_network()
        port = await self._store.ports.create(
            subnet=subnet,
            project_id=project_id,
            device_id=device_id,
            device_owner=DEVICE_OWNER_CAPSULE,
            host=host,
            pick_address=lowest_free_address,
            mac_address=random_mac,
        )
        log.info(
            "port allocated", port=port.id, capsule=device_id, ip=str(port.ip_address), host=host
        )
        return port

    async def release_ports(self, device_id: str) -> None:
        await self._store.ports.delete_for_device(device_id)

    # ---- PortSource, for the CNI daemon ----

    async def find_port(self, pod_name: str) -> PortBinding | None:
        found = await self._store.ports.find_with_network(pod_name)
        if found is None:
            return None
        port, network, subnet = found
        return PortBinding(
            port_id=port.id,
            network_id=network.id,
            mac=port.mac_address,
            ip=ipaddress.IPv4Interface(f"{port.ip_address}/{subnet.cidr.prefixlen}"),
            gateway=subnet.gateway_ip,
            bridge=bridge_name(network.id),
            mtu=network.mtu,
            bound_container_id=port.binding_container_id,
            bound_host_ifname=port.binding_host_ifname,
        )

    async def port_bound(self, port_id: str, container_id: str, host_ifname: str) -> None:
        await self._store.ports.set_binding(port_id, container_id, host_ifname)

    async def port_unbound(self, port_id: str, container_id: str) -> None:
        await self._store.ports.clear_binding(port_id, container_id)


def bridge_name(network_id: str) -> str:
    """The Linux bridge of a network on every host: distinct per network, at most 15 characters."""
    return "cbr-" + uuidlib.UUID(network_id).hex[:11]
