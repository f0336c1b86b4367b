"""Networks, subnets and ports in the database.

An address is chosen and its port inserted in one write transaction, and the (subnet, ip) unique
constraint backs that up on databases where transactions run side by side: two ports can never get
one address.
"""

from __future__ import annotations

import ipaddress
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError

from capsa.model.clock import utcnow
from capsa.model.network import Network, Port, Subnet
from capsa.store import schema
from capsa.store.db import Database

n_t = schema.networks
s_t = schema.subnets
p_t = schema.ports

# Given the subnet and the addresses in use (as integers), the address for a new port, or None.
AddressPicker = Callable[[Subnet, set[int]], int | None]


class SubnetFull(Exception):
    def __init__(self, subnet: Subnet) -> None:
        super().__init__(f"subnet {subnet.cidr} of network {subnet.network_id} has no free address")
        self.subnet = subnet


class PortStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def ensure_default_network(
        self, project_id: str, cidr: ipaddress.IPv4Network, mtu: int
    ) -> tuple[Network, Subnet]:
        """The network every capsule joins, created on first use (the gateway is the first host)."""

        def ensure(conn: Connection) -> tuple[Row[Any], Row[Any] | None]:
            row = conn.execute(select(n_t).where(n_t.c.is_default.is_(True))).first()
            if row is None:
                now = utcnow()
                network_id = str(uuidlib.uuid4())
                conn.execute(
                    n_t.insert().values(
                        id=network_id,
                        name="default",
                        project_id=project_id,
                        shared=True,
                        is_default=True,
                        mtu=mtu,
                        created_at=now,
                        updated_at=now,
                    )
                )
                conn.execute(
                    s_t.insert().values(
                        id=str(uuidlib.uuid4()),
                        network_id=network_id,
                        project_id=project_id,
                        cidr=str(cidr),
                        gateway_ip=str(cidr.network_address + 1),
                        created_at=now,
                        updated_at=now,
                    )
                )
                row = conn.execute(select(n_t).where(n_t.c.id == network_id)).one()
            return row, conn.execute(select(s_t).where(s_t.c.network_id == row.id)).first()

        row, subnet = await self._db.run_write(ensure)
        if subnet is None:
            raise LookupError(f"the default network {row.id} has no subnet")
        return _network(row), _subnet(subnet)

    async def default_network(self) -> tuple[Network, Subnet] | None:
        """The default network and its subnet, if they were created."""

        def read(conn: Connection) -> tuple[Network, Subnet] | None:
            network = conn.execute(select(n_t).where(n_t.c.is_default.is_(True))).first()
            if network is None:
                return None
            subnet = conn.execute(select(s_t).where(s_t.c.network_id == network.id)).first()
            return (_network(network), _subnet(subnet)) if subnet else None

        return await self._db.run_read(read)

    async def get_network(self, network_id: str) -> Network | None:
        query = select(n_t).where(n_t.c.id == network_id)
        row = await self._db.run_read(lambda conn: conn.execute(query).first())
        return _network(row) if row else None

    async def get_subnet(self, subnet_id: str) -> Subnet | None:
        query = select(s_t).where(s_t.c.id == subnet_id)
        row = await self._db.run_read(lambda conn: conn.execute(query).first())
        return _subnet(row) if row else None

    async def find_by_device(self, device_id: str) -> Port | None:
        query = select(p_t).where(p_t.c.device_id == device_id)
        row = await self._db.run_read(lambda conn: conn.execute(query).first())
        return _port(row) if row else None

    async def find_with_network(self, device_id: str) -> tuple[Port, Network, Subnet] | None:
        """The device's port with its network and subnet, read in one query: the CNI daemon
        needs all three for every ADD."""
        query = (
            select(
                p_t,
                n_t.c.name.label("network_name"),
                n_t.c.project_id.label("network_project_id"),
                n_t.c.shared.label("network_shared"),
                n_t.c.is_default.label("network_is_default"),
                n_t.c.mtu.label("network_mtu"),
                s_t.c.project_id.label("subnet_project_id"),
                s_t.c.cidr.label("subnet_cidr"),
                s_t.c.gateway_ip.label("subnet_gateway_ip"),
            )
            .join(n_t, n_t.c.id == p_t.c.network_id)
            .join(s_t, s_t.c.id == p_t.c.subnet_id)
            .where(p_t.c.device_id == device_id)
        )
        row = await self._db.run_read(lambda conn: conn.execute(query).first())
        if row is None:
            return None
        network = Network(
            id=row.network_id,
            name=row.network_name,
            project_id=row.network_project_id,
            shared=row.network_shared,
            is_default=row.network_is_default,
            mtu=row.network_mtu,
        )
        subnet = Subnet(
            id=row.subnet_id,
            network_id=row.network_id,
            project_id=row.subnet_project_id,
            cidr=ipaddress.IPv4Network(row.subnet_cidr),
            gateway_ip=ipaddress.IPv4Address(row.subnet_gateway_ip),
        )
        return _port(row), network, subnet

    async def create(
        self,
        *,
        subnet: Subnet,
        project_id: str,
        device_id: str,
        device_owner: str,
        host: str | None,
        pick_address: AddressPicker,
        mac_address: Callable[[], str],
        attempts: int = 8,
    ) -> Port:
        """A new port on ``subnet`` with an address from ``pick_address``; raises SubnetFull."""
        used_query = select(p_t.c.ip_address).where(p_t.c.subnet_id == subnet.id)

        def allocate(conn: Connection) -> Row[Any]:
            used = {int(ipaddress.IPv4Address(ip)) for (ip,) in conn.execute(used_query)}
            address = pick_address(subnet, used)
            if address is None:
                raise SubnetFull(subnet)
            now = utcnow()
            port_id = str(uuidlib.uuid4())
            conn.execute(
                p_t.insert().values(
                    id=port_id,
                    network_id=subnet.network_id,
                    subnet_id=subnet.id,
                    project_id=project_id,
                    ip_address=str(ipaddress.IPv4Address(address)),
                    mac_address=mac_address(),
                    device_id=device_id,
                    device_owner=device_owner,
                    status="DOWN",
                    host=host,
                    created_at=now,
                    updated_at=now,
                )
            )
            return conn.execute(select(p_t).where(p_t.c.id == port_id)).one()

        for _ in range(attempts):
            try:
                return _port(await self._db.run_write(allocate))
            except IntegrityError:
                # Another allocation took the address or the MAC first: choose again.
                continue
        raise SubnetFull(subnet)

    async def set_binding(self, port_id: str, container_id: str, host_ifname: str) -> None:
        statement = (
            update(p_t)
            .where(p_t.c.id == port_id)
            .values(
                status="ACTIVE",
                binding_container_id=container_id,
                binding_host_ifname=host_ifname,
                updated_at=utcnow(),
            )
        )
        await self._db.run_write(lambda conn: conn.execute(statement))

    async def clear_binding(self, port_id: str, container_id: str) -> None:
        """Forgets a binding, unless the port was bound again for a newer sandbox meanwhile."""
        statement = (
            update(p_t)
            .where(p_t.c.id == port_id, p_t.c.binding_container_id == container_id)
            .values(
                status="DOWN",
                binding_container_id=None,
                binding_host_ifname=None,
                updated_at=utcnow(),
            )
        )
        await self._db.run_write(lambda conn: conn.execute(statement))

    async def delete_for_device(self, device_id: str) -> None:
        statement = delete(p_t).where(p_t.c.device_id == device_id)
        await self._db.run_write(lambda conn: conn.execute(statement))

    async def list_for_subnet(self, subnet_id: str) -> list[Port]:
        query = select(p_t).where(p_t.c.subnet_id == subnet_id)
        return await self._db.run_read(lambda conn: [_port(r) for r in conn.execute(query)])


def _network(row: Row[Any]) -> Network:
    return Network(
        id=row.id,
        name=row.name,
        project_id=row.project_id,
        shared=row.shared,
        is_default=row.is_default,
        mtu=row.mtu,
    )


def _subnet(row: Row[Any]) -> Subnet:
    return Subnet(
        id=row.id,
        network_id=row.network_id,
        project_id=row.project_id,
        cidr=ipaddress.IPv4Network(row.cidr),
        gateway_ip=ipaddress.IPv4Address(row.gateway_ip),
    )


def _port(row: Row[Any]) -> Port:
    return Port(
        id=row.id,
        network_id=row.network_id,
        subnet_id=row.subnet_id,
        project_id=row.project_id,
        ip_address=ipaddress.IPv4Address(row.ip_address),
        mac_address=row.mac_address,
        device_id=row.device_id,
        device_owner=row.device_owner,
        status=row.status,
        host=row.host,
        binding_container_id=row.binding_container_id,
        binding_host_ifname=row.binding_host_ifname,
        created_at=row.created_at,
    )
