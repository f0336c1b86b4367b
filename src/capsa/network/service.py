"""capsa's network service: a capsule's port, on the network and in the security groups it asked
for (or its project's defaults, made on demand), allocated before its sandbox.

It is also where the CNI daemon learns what to bind (:class:`capsa.network.types.PortSource`).
"""

from __future__ import annotations

import ipaddress
import uuid as uuidlib

from capsa.log import get_logger
from capsa.model.network import Attachment, Port
from capsa.network.ipam import lowest_free_address, random_mac
from capsa.network.types import PortBinding
from capsa.store import Store
from capsa.store.networks import ProjectDefaults

log = get_logger(__name__)

DEVICE_OWNER_CAPSULE = "compute:capsule"


class NetworkService:
    """``default_cidr`` is the pool that projects' default subnets come from, a
    ``/default_prefixlen`` each (the whole pool when it is no larger)."""

    def __init__(
        self, store: Store, default_cidr: str, mtu: int, default_prefixlen: int = 24
    ) -> None:
        self._store = store
        self._pool = ipaddress.IPv4Network(default_cidr)
        self._prefixlen = max(default_prefixlen, self._pool.prefixlen)
        self._mtu = mtu

    async def project_defaults(self, project_id: str) -> ProjectDefaults:
        """The project's default network, subnet and security group, made if missing."""
        return await self._store.networks.ensure_project_defaults(
            project_id, self._pool, self._prefixlen, self._mtu
        )

    async def allocate_port(
        self, device_id: str, project_id: str, host: str, attachment: Attachment | None = None
    ) -> Port:
        """The device's port, created on first call; later calls return the same port.

        Raises capsa.store.networks.NotFound or Ambiguous for a network or group it cannot use,
        capsa.store.ports.SubnetFull when the network has no free address (nothing is made).
        """
        existing = await self._store.ports.find_by_device(device_id)
        if existing is not None:
            return existing
        attachment = attachment or Attachment()
        needs_defaults = attachment.network is None or not attachment.security_groups
        defaults = await self.project_defaults(project_id) if needs_defaults else None
        if attachment.network is not None:
            network_id = (
                await self._store.networks.resolve_network(project_id, attachment.network)
            ).id
        else:
            assert defaults is not None
            network_id = defaults.network.id
        if attachment.security_groups:
            groups = await self._store.networks.resolve_security_groups(
                project_id, attachment.security_groups
            )
        else:
            assert defaults is not None
            groups = [defaults.security_group.id]
        port = await self._store.ports.create(
            network_id=network_id,
            project_id=project_id,
            device_id=device_id,
            device_owner=DEVICE_OWNER_CAPSULE,
            host=host,
            pick_address=lowest_free_address,
            mac_address=random_mac,
            security_group_ids=groups,
        )
        log.info(
            "port allocated",
            port=port.id,
            capsule=device_id,
            network=network_id,
            ip=str(port.ip_address),
            host=host,
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
