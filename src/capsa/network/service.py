"""capsa's network service: a capsule's ports, one on each network it asked for and in the security
groups it asked for (or its project's defaults, made on demand), allocated before its sandbox.

It is also where the CNI daemon learns what to bind (:class:`capsa.network.types.PortSource`).
"""

from __future__ import annotations

import ipaddress
import uuid as uuidlib
from collections.abc import Sequence

from capsa.log import get_logger
from capsa.model.network import DEVICE_OWNER_CAPSULE, Attachment, LocalPort, Port
from capsa.network.ipam import lowest_free_address, random_mac
from capsa.network.types import PortBinding
from capsa.store import Store
from capsa.store.networks import ProjectDefaults

log = get_logger(__name__)


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

    async def allocate_ports(
        self, device_id: str, project_id: str, host: str, attachment: Attachment | None = None
    ) -> list[Port]:
        """The device's ports, one per network it joins in its interface order, created on the
        first call (all in one transaction); later calls return the same ports.

        Raises capsa.store.networks.NotFound or Ambiguous for a network or group it cannot use,
        RepeatedNetwork for a network named twice, capsa.store.ports.SubnetFull when a network
        has no free address (nothing is made).
        """
        existing = await self._store.ports.list_for_device(device_id)
        if existing:
            return existing
        attachment = attachment or Attachment()
        needs_defaults = not attachment.networks or not attachment.security_groups
        defaults = await self.project_defaults(project_id) if needs_defaults else None
        if attachment.networks:
            network_ids = [
                n.id
                for n in await self._store.networks.resolve_networks(
                    project_id, attachment.networks
                )
            ]
        else:
            assert defaults is not None
            network_ids = [defaults.network.id]
        if attachment.security_groups:
            groups = await self._store.networks.resolve_security_groups(
                project_id, attachment.security_groups
            )
        else:
            assert defaults is not None
            groups = [defaults.security_group.id]
        ports = await self._store.ports.create_for_device(
            network_ids=network_ids,
            project_id=project_id,
            device_id=device_id,
            host=host,
            pick_address=lowest_free_address,
            mac_address=random_mac,
            security_group_ids=groups,
        )
        for port in ports:
            log.info(
                "port allocated",
                port=port.id,
                capsule=device_id,
                network=port.network_id,
                ip=str(port.ip_address),
                interface=port.interface_index,
                host=host,
            )
        return ports

    async def release_ports(self, device_id: str) -> None:
        await self._store.ports.delete_for_device(device_id)

    # ---- PortSource, for the CNI daemon: on its threads, which they block ----

    def find_ports(self, pod_name: str) -> list[PortBinding]:
        return [
            PortBinding(
                port_id=port.id,
                network_id=port.network_id,
                mac=port.mac_address,
                ip=port.ip_interface,
                gateway=port.gateway_ip,
                bridge=bridge_name(port.network_id),
                mtu=port.mtu,
                bound_container_id=port.binding_container_id,
                bound_host_ifname=port.binding_host_ifname,
            )
            for port in self._store.ports.to_bind(pod_name)
        ]

    def bindings_of(self, port_ids: Sequence[str]) -> dict[str, tuple[str, str] | None]:
        return self._store.ports.bindings_of(port_ids)

    def ports_bound(self, container_id: str, host_ifnames: dict[str, str]) -> None:
        self._store.ports.set_bindings(container_id, host_ifnames)

    def ports_unbound(self, port_ids: Sequence[str], container_id: str) -> None:
        self._store.ports.clear_bindings(port_ids, container_id)

    def pod_unbound(self, pod_name: str, container_id: str) -> list[str]:
        return self._store.ports.clear_device_bindings(pod_name, container_id)


def capsule_port_bindings(ports: Sequence[LocalPort]) -> dict[str, list[PortBinding]]:
    """The capsules' ports among a host's view of its ``ports``, by capsule, each in its
    interface order, as :meth:`NetworkService.find_ports` gives them."""
    by_capsule: dict[str, list[LocalPort]] = {}
    for local in ports:
        if local.port.device_owner == DEVICE_OWNER_CAPSULE:
            by_capsule.setdefault(local.port.device_id, []).append(local)
    bridges = {local.network.id: bridge_name(local.network.id) for local in ports}
    return {
        capsule: [
            PortBinding(
                port_id=local.port.id,
                network_id=local.port.network_id,
                mac=local.port.mac_address,
                ip=ipaddress.IPv4Interface((local.port.ip_address, local.subnet.cidr.prefixlen)),
                gateway=local.subnet.gateway_ip,
                bridge=bridges[local.network.id],
                mtu=local.network.mtu,
                bound_container_id=local.port.binding_container_id,
                bound_host_ifname=local.port.binding_host_ifname,
            )
            for local in sorted(locals_, key=lambda local: local.port.interface_index)
        ]
        for capsule, locals_ in by_capsule.items()
    }


def bridge_name(network_id: str) -> str:
    """The Linux bridge of a network on every host: distinct per network, at most 15 characters."""
    return "cbr-" + uuidlib.UUID(network_id).hex[:11]
