"""Ports in the database, with their addresses (IPAM) and security groups.

An address is chosen and its port inserted in one write transaction, and the (subnet, ip) unique
constraint backs that up on databases where transactions run side by side: two ports can never get
one address. A port is deleted with its security group memberships, and its address is free again.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import uuid as uuidlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError

from capsa.model.clock import utcnow
from capsa.model.network import (
    DEVICE_OWNER_CAPSULE,
    HostNetworkView,
    HostPortMapping,
    LocalPort,
    Network,
    Port,
    PortToBind,
    RemotePort,
    SecurityGroupRule,
    Subnet,
)
from capsa.store import capsules, notify, schema
from capsa.store.db import DriverStatement
from capsa.store.networks import (
    EnforcedStore,
    NotFound,
    network_from_row,
    rule_from_row,
    subnet_from_row,
)

n_t = schema.networks
s_t = schema.subnets
p_t = schema.ports
pg_t = schema.port_security_groups
r_t = schema.security_group_rules
h_t = schema.hosts

T = TypeVar("T")

# Given the subnet and the addresses in use (as integers), the address for a new port, or None.
AddressPicker = Callable[[Subnet, set[int]], int | None]
# An allocation that lost its address or MAC to a concurrent one chooses again, this many times.
_ALLOCATION_ATTEMPTS = 8


# A port's row with its network's and its subnet's columns (prefixed n__ and s__: _Prefixed).
_PORTS_WITH_NETWORKS = (
    select(
        p_t,
        *(c.label(f"n__{c.name}") for c in n_t.c),
        *(c.label(f"s__{c.name}") for c in s_t.c),
    )
    .join(n_t, n_t.c.id == p_t.c.network_id)
    .join(s_t, s_t.c.id == p_t.c.subnet_id)
)
# The ports of the capsule ``device``: those capsa allocated for it (capsules.CAPSA_MADE).
_OF_DEVICE = (p_t.c.device_id == bindparam("device")) & capsules.CAPSA_MADE
# The CNI daemon's statements, on every ADD's and DEL's path: run by the driver itself.
_PORTS_TO_BIND = DriverStatement(
    select(
        p_t.c.id,
        p_t.c.network_id,
        p_t.c.mac_address,
        p_t.c.ip_address,
        s_t.c.cidr,
        s_t.c.gateway_ip,
        n_t.c.mtu,
        p_t.c.binding_container_id,
        p_t.c.binding_host_ifname,
    )
    .join(n_t, n_t.c.id == p_t.c.network_id)
    .join(s_t, s_t.c.id == p_t.c.subnet_id)
    .where(_OF_DEVICE)
    .order_by(p_t.c.interface_index)
)
# A capsule's port's binding, by the port's id.
_PORT_BINDING = DriverStatement(
    select(p_t.c.binding_container_id, p_t.c.binding_host_ifname).where(
        p_t.c.id == bindparam("port"), capsules.CAPSA_MADE
    )
)
_SET_BINDING = DriverStatement(
    update(p_t)
    .where(p_t.c.id == bindparam("where_id"))
    .values(
        status="ACTIVE",
        binding_container_id=bindparam("container"),
        binding_host_ifname=bindparam("host_ifname"),
        updated_at=bindparam("updated_at"),
    )
)
_UNBOUND = {"status": "DOWN", "binding_container_id": None, "binding_host_ifname": None}
_CLEAR_DEVICE_BINDINGS = DriverStatement(
    update(p_t)
    .where(_OF_DEVICE)
    .where(p_t.c.binding_container_id == bindparam("where_container"))
    .values({**_UNBOUND, "updated_at": bindparam("updated_at")})
    .returning(p_t.c.id)
)
_DEVICE_PORTS = select(p_t).where(_OF_DEVICE).order_by(p_t.c.interface_index)
_CLEAR_BINDINGS = (
    update(p_t)
    .where(p_t.c.id.in_(bindparam("where_ids", expanding=True)))
    .where(p_t.c.binding_container_id == bindparam("where_container"))
    .values(_UNBOUND)
)

# Allocations' statements.
_SUBNET_ADDRESSES = select(p_t.c.ip_address).where(p_t.c.subnet_id == bindparam("subnet"))
# An allocation's (every capsule start's) statements, built once.
_NETWORK_SUBNETS = (
    select(s_t).where(s_t.c.network_id == bindparam("network")).order_by(s_t.c.created_at)
)
_NETWORK_SUBNET = _NETWORK_SUBNETS.where(s_t.c.id == bindparam("subnet"))
_PORT_BY_ID = select(p_t).where(p_t.c.id == bindparam("port"))
_INSERT_PORT = p_t.insert()
_ADDRESS_TAKEN = select(p_t.c.id).where(
    p_t.c.subnet_id == bindparam("subnet"), p_t.c.ip_address == bindparam("ip")
)

_GROUPS_OF_PORTS = select(pg_t.c.port_id, pg_t.c.security_group_id).where(
    pg_t.c.port_id.in_(bindparam("ports", expanding=True))
)
# The network agent's view of its host (PortStore.host_view), read at every change of a port,
# group or rule anywhere: statements built once, each bound to the host alone (subqueries
# rather than lists of ids, which SQLAlchemy would expand into the statement at every read).
_HOST_PORTS_WITH_NETWORKS = _PORTS_WITH_NETWORKS.where(p_t.c.host == bindparam("host")).order_by(
    p_t.c.created_at, p_t.c.id
)
_HOST_PORT_GROUPS = (
    select(pg_t.c.port_id, pg_t.c.security_group_id)
    .join(p_t, p_t.c.id == pg_t.c.port_id)
    .where(p_t.c.host == bindparam("host"))
    .order_by(pg_t.c.port_id, pg_t.c.security_group_id)
)
_HOST_GROUP_IDS = _HOST_PORT_GROUPS.with_only_columns(pg_t.c.security_group_id).order_by(None)
_HOST_RULES = (
    select(r_t)
    .where(r_t.c.security_group_id.in_(_HOST_GROUP_IDS))
    .order_by(r_t.c.created_at, r_t.c.id)
)
_HOST_REMOTE_GROUP_MEMBERS = (
    select(pg_t.c.security_group_id, p_t.c.network_id, p_t.c.ip_address)
    .join(p_t, p_t.c.id == pg_t.c.port_id)
    .where(
        pg_t.c.security_group_id.in_(
            select(r_t.c.remote_group_id).where(r_t.c.security_group_id.in_(_HOST_GROUP_IDS))
        )
    )
    .order_by(pg_t.c.security_group_id, p_t.c.ip_address, p_t.c.network_id)
)
_HOST_REMOTE_PORTS = (
    select(p_t.c.network_id, p_t.c.host, h_t.c.tunnel_ip, p_t.c.mac_address)
    .join(h_t, h_t.c.name == p_t.c.host)
    .where(
        p_t.c.host != bindparam("host"),
        h_t.c.tunnel_ip.is_not(None),
        p_t.c.network_id.in_(select(p_t.c.network_id).where(p_t.c.host == bindparam("host"))),
    )
    .order_by(p_t.c.host, p_t.c.mac_address)
)

# What a host's view was read from (rows of plain values): equal rows make an equal view.
HostViewRows = tuple[tuple[Any, ...], ...]


class SubnetFull(Exception):
    def __init__(self, subnet: Subnet) -> None:
        super().__init__(
            f"No more IP addresses available: subnet {subnet.cidr} of network "
            f"{subnet.network_id} has no free address"
        )
        self.subnet = subnet


class AddressInUse(Exception):
    """An address that a port asked for by name is another port's (or the gateway)."""


class MacAddressInUse(AddressInUse):
    """A MAC that a port asked for by name is another port's."""


class InvalidAddress(Exception):
    """An address asked for that the network's subnets cannot give."""


class PortStore(EnforcedStore):
    async def create(
        self,
        *,
        network_id: str,
        project_id: str,
        device_id: str,
        device_owner: str,
        host: str | None,
        pick_address: AddressPicker,
        mac_address: Callable[[], str],
        security_group_ids: Sequence[str] = (),
        subnet_id: str | None = None,
        ip_address: ipaddress.IPv4Address | None = None,
        fixed_mac: str | None = None,
        name: str = "",
        description: str = "",
        admin_state_up: bool = True,
    ) -> Port:
        """A new port on the network with an address of one of its subnets (``subnet_id`` and
        ``ip_address`` choose); raises SubnetFull when none has a free address."""
        values = {
            "project_id": project_id,
            "name": name,
            "description": description,
            "admin_state_up": admin_state_up,
            "device_id": device_id,
            "device_owner": device_owner,
            "host": host,
        }

        def work(conn: Connection) -> Port:
            port_id = _insert_port(
                conn,
                network_id,
                values,
                pick_address,
                fixed_mac or mac_address(),
                subnet_id=subnet_id,
                ip_address=ip_address,
                check_mac=fixed_mac is not None,
            )
            _set_groups(conn, port_id, security_group_ids)
            return _get(conn, port_id)

        return await self._allocating(work, network_id, subnet_id)

    async def create_for_device(
        self,
        *,
        network_ids: Sequence[str],
        project_id: str,
        device_id: str,
        host: str,
        pick_address: AddressPicker,
        mac_address: Callable[[], str],
        security_group_ids: Sequence[str],
    ) -> list[Port]:
        """A port on each network for the capsule ``device_id``, in one transaction (all or
        none), in its interface order; raises SubnetFull when one of the networks has no
        address."""
        values = {
            "project_id": project_id,
            "name": "",
            "description": "",
            "admin_state_up": True,
            "device_id": device_id,
            "device_owner": DEVICE_OWNER_CAPSULE,
            "host": host,
        }

        def work(conn: Connection) -> list[Port]:
            for index, network_id in enumerate(network_ids):
                port_id = _insert_port(
                    conn,
                    network_id,
                    {**values, "interface_index": index},
                    pick_address,
                    mac_address(),
                )
                _set_groups(conn, port_id, security_group_ids)
            return _ports(conn, _DEVICE_PORTS, {"device": device_id})

        return await self._allocating(work, network_ids[-1], None)

    async def _allocating(
        self, work: Callable[[Connection], T], network_id: str, subnet_id: str | None
    ) -> T:
        """Runs an allocation, choosing again when another one took an address or MAC first."""
        for _ in range(_ALLOCATION_ATTEMPTS):
            try:
                return await self._write(work)
            except IntegrityError:
                continue
        subnet = await self._db.run_read(lambda conn: _subnets_of(conn, network_id, subnet_id)[-1])
        raise SubnetFull(subnet)

    async def get(self, port_id: str) -> Port:
        return await self._db.run_read(lambda conn: _get(conn, port_id))

    async def list_ports(self, project_id: str | None) -> list[Port]:
        """The project's ports (every port when None)."""
        query = select(p_t).order_by(p_t.c.created_at, p_t.c.id)
        if project_id is not None:
            query = query.where(p_t.c.project_id == project_id)
        return await self._db.run_read(lambda conn: _ports(conn, query), long=True)

    async def update(
        self, port_id: str, *, security_group_ids: Sequence[str] | None = None, **values: Any
    ) -> Port:
        def work(conn: Connection) -> Port:
            _get(conn, port_id)
            conn.execute(
                update(p_t).where(p_t.c.id == port_id).values(**values, updated_at=utcnow())
            )
            if security_group_ids is not None:
                conn.execute(delete(pg_t).where(pg_t.c.port_id == port_id))
                _set_groups(conn, port_id, security_group_ids)
            return _get(conn, port_id)

        return await self._write(work)

    async def delete(self, port_id: str) -> None:
        def work(conn: Connection) -> None:
            _get(conn, port_id)
            conn.execute(delete(p_t).where(p_t.c.id == port_id))

        await self._write(work)

    async def list_for_device(self, device_id: str) -> list[Port]:
        """The device's ports, in its interface order."""
        params = {"device": device_id}
        return await self._db.run_read(lambda conn: _ports(conn, _DEVICE_PORTS, params))

    # The CNI daemon's statements: run on its threads, which they block (see
    # Database.run_write_blocking).

    def to_bind(self, device_id: str) -> list[PortToBind]:
        """The device's ports as the CNI daemon binds them, in its interface order: one narrow
        query, since every ADD waits for it."""
        return [
            PortToBind(
                id=port_id,
                network_id=network_id,
                mac_address=mac_address,
                ip_interface=ipaddress.IPv4Interface(f"{ip_address}/{cidr.rpartition('/')[2]}"),
                gateway_ip=ipaddress.IPv4Address(gateway_ip),
                mtu=mtu,
                binding_container_id=binding_container_id,
                binding_host_ifname=binding_host_ifname,
            )
            for (
                port_id,
                network_id,
                mac_address,
                ip_address,
                cidr,
                gateway_ip,
                mtu,
                binding_container_id,
                binding_host_ifname,
            ) in self._db.read_rows_blocking(_PORTS_TO_BIND, {"device": device_id})
        ]

    def bindings_of(self, port_ids: Sequence[str]) -> dict[str, tuple[str, str] | None]:
        """The binding of each of these ports that is a capsule's: its sandbox's container id
        and host end, or None. One query a port: the daemon asks once, as it starts."""
        found: dict[str, tuple[str, str] | None] = {}
        for port_id in port_ids:
            for container_id, host_ifname in self._db.read_rows_blocking(
                _PORT_BINDING, {"port": port_id}
            ):
                found[port_id] = (container_id, host_ifname) if container_id else None
        return found

    def set_bindings(self, container_id: str, host_ifnames: dict[str, str]) -> None:
        """Records that the sandbox ``container_id`` holds each port (by id) through its host
        interface; one transaction for all."""
        now = utcnow()
        params = [
            {
                "where_id": port_id,
                "container": container_id,
                "host_ifname": host_ifname,
                "updated_at": now,
            }
            for port_id, host_ifname in host_ifnames.items()
        ]
        self._write_blocking(functools.partial(_SET_BINDING.run_many, params=params))

    def clear_bindings(self, port_ids: Sequence[str], container_id: str) -> None:
        """Forgets the ports' bindings, but those bound again for a newer sandbox meanwhile.

        Wakes the network agents only when a binding went: a repeated DEL (kubelet-style
        runtimes send two per sandbox, StopPodSandbox's and RemovePodSandbox's) finds nothing.
        """
        params = {"where_ids": list(port_ids), "where_container": container_id}

        def work(conn: Connection) -> None:
            if conn.execute(_CLEAR_BINDINGS, {**params, "updated_at": utcnow()}).rowcount:
                notify.wake(conn, notify.NETWORK)

        self._db.run_write_blocking(work)

    def clear_device_bindings(self, device_id: str, container_id: str) -> list[str]:
        """Forgets the bindings that the sandbox ``container_id`` holds on the device's ports;
        returns the ids of the ports it unbound. One statement: a DEL needs no read first.

        Wakes the network agents only when a binding went (not for a repeated DEL).
        """
        params = {"device": device_id, "where_container": container_id}

        def work(conn: Connection) -> list[str]:
            rows = _CLEAR_DEVICE_BINDINGS.rows(conn, {**params, "updated_at": utcnow()})
            unbound = [port_id for (port_id,) in rows]
            if unbound:
                notify.wake(conn, notify.NETWORK)
            return unbound

        return self._db.run_write_blocking(work)

    async def delete_for_device(self, device_id: str) -> None:
        params = {"device": device_id}
        await self._write(lambda conn: conn.execute(delete(p_t).where(_OF_DEVICE), params))

    async def list_for_subnet(self, subnet_id: str) -> list[Port]:
        query = select(p_t).where(p_t.c.subnet_id == subnet_id)
        return await self._db.run_read(lambda conn: _ports(conn, query), long=True)

    async def host_view_if_changed(
        self, host: str, known: HostViewRows | None, *, long: bool = False
    ) -> tuple[HostViewRows, HostNetworkView | None]:
        """What the host's view is read from, and the view, or None when that is ``known`` (what
        an earlier call returned): nothing the view holds changed since. The view: the host's
        ports with their networks, subnets, groups' rules and remote groups' members, the other
        hosts' ports on the same networks (for the overlay), and the host ports of its capsules.
        ``long``: many ports, read on a database thread."""

        def work(conn: Connection) -> tuple[HostViewRows, HostNetworkView | None]:
            rows = _host_view_rows(conn, host)
            return rows, (None if rows == known else _host_view(rows))

        return await self._db.run_read(work, long=long)


def _host_view_rows(conn: Connection, host: str) -> HostViewRows:
    """Every row a host's view is made from, in one transaction (one statement each)."""
    params = {"host": host}
    return (
        tuple(conn.execute(_HOST_PORTS_WITH_NETWORKS, params).all()),
        tuple(conn.execute(_HOST_PORT_GROUPS, params).all()),
        tuple(conn.execute(_HOST_RULES, params).all()),
        tuple(conn.execute(_HOST_REMOTE_GROUP_MEMBERS, params).all()),
        tuple(conn.execute(_HOST_REMOTE_PORTS, params).all()),
        tuple(capsules.ports_to_run(conn, host)),
    )


def _host_view(rows: HostViewRows) -> HostNetworkView:
    port_rows, group_rows, rule_rows, member_rows, remote_rows, ports_to_run = rows
    groups: dict[str, list[str]] = {}
    for port_id, group_id in group_rows:
        groups.setdefault(port_id, []).append(group_id)
    # A host's ports share few networks: each network and subnet is decoded once.
    networks: dict[str, Network] = {}
    subnets: dict[str, Subnet] = {}
    local = []
    for row in port_rows:
        if row.network_id not in networks:
            networks[row.network_id] = network_from_row(_Prefixed(row, "n__"))  # type: ignore[arg-type]
        if row.subnet_id not in subnets:
            subnets[row.subnet_id] = subnet_from_row(_Prefixed(row, "s__"))  # type: ignore[arg-type]
        port = _port(row, groups.get(row.id, ()))
        local.append(LocalPort(port, networks[row.network_id], subnets[row.subnet_id]))
    rules: dict[str, list[SecurityGroupRule]] = {g: [] for ids in groups.values() for g in ids}
    for row in rule_rows:
        rules[row.security_group_id].append(rule_from_row(row))
    members: dict[str, list[tuple[str, ipaddress.IPv4Address]]] = {
        r.remote_group_id: [] for rs in rules.values() for r in rs if r.remote_group_id
    }
    for group_id, network_id, ip in member_rows:
        members[group_id].append((network_id, ipaddress.IPv4Address(ip)))
    # A capsule's host ports lead to its first interface.
    first_port = {lp.port.device_id: lp.port.id for lp in local if not lp.port.interface_index}
    host_ports = tuple(
        HostPortMapping(
            first_port[capsule_uuid], spec.host_port, spec.container_port, spec.protocol.lower()
        )
        for capsule_uuid, spec in ports_to_run
        if capsule_uuid in first_port and spec.host_port
    )
    return HostNetworkView(
        ports=tuple(local),
        rules={g: tuple(rs) for g, rs in rules.items()},
        members={g: tuple(ms) for g, ms in members.items()},
        remote_ports=tuple(RemotePort(*row) for row in remote_rows),
        host_ports=host_ports,
    )


class _Prefixed:
    """The columns of a joined row that carry ``prefix``, under their own names."""

    def __init__(self, row: Row[Any], prefix: str) -> None:
        self._mapping = row._mapping
        self._prefix = prefix

    def __getattr__(self, name: str) -> Any:
        return self._mapping[self._prefix + name]


def _insert_port(
    conn: Connection,
    network_id: str,
    values: dict[str, Any],
    pick_address: AddressPicker,
    mac: str,
    *,
    subnet_id: str | None = None,
    ip_address: ipaddress.IPv4Address | None = None,
    check_mac: bool = False,
) -> str:
    """Inserts a port on the network with an address of one of its subnets; returns its id."""
    subnets = _subnets_of(conn, network_id, subnet_id)
    chosen: tuple[Subnet, int] | None = None
    for subnet in subnets:
        if ip_address is not None:
            if ip_address not in subnet.cidr:
                continue
            params = {"subnet": subnet.id, "ip": str(ip_address)}
            if ip_address == subnet.gateway_ip or conn.execute(_ADDRESS_TAKEN, params).first():
                raise AddressInUse(
                    f"Unable to complete operation for network {network_id}. The IP "
                    f"address {ip_address} is in use."
                )
            chosen = (subnet, int(ip_address))
            break
        address = pick_address(subnet, _used_addresses(conn, subnet.id))
        if address is not None:
            chosen = (subnet, address)
            break
    if chosen is None:
        if ip_address is not None:
            raise InvalidAddress(
                f"IP address {ip_address} is not a valid IP for the specified subnet"
            )
        raise SubnetFull(subnets[-1])
    if check_mac and conn.execute(select(p_t.c.id).where(p_t.c.mac_address == mac)).first():
        raise MacAddressInUse(
            f"Unable to complete operation for network {network_id}. The mac address "
            f"{mac} is in use."
        )
    subnet, address = chosen
    now = utcnow()
    port_id = str(uuidlib.uuid4())
    conn.execute(
        _INSERT_PORT,
        {
            "id": port_id,
            "network_id": network_id,
            "subnet_id": subnet.id,
            "ip_address": str(ipaddress.IPv4Address(address)),
            "mac_address": mac,
            "status": "DOWN",
            "created_at": now,
            "updated_at": now,
            **values,
        },
    )
    return port_id


def _subnets_of(conn: Connection, network_id: str, subnet_id: str | None) -> list[Subnet]:
    if subnet_id is None:
        rows = conn.execute(_NETWORK_SUBNETS, {"network": network_id})
    else:
        rows = conn.execute(_NETWORK_SUBNET, {"network": network_id, "subnet": subnet_id})
    subnets = [subnet_from_row(row) for row in rows]
    if not subnets:
        raise NotFound(
            "subnet of network" if subnet_id is None else "subnet", subnet_id or network_id
        )
    return subnets


def _used_addresses(conn: Connection, subnet_id: str) -> set[int]:
    # Every port of the subnet, at every allocation: inet_aton reads the addresses (which capsa
    # wrote, dotted quads all) ten times faster than ipaddress.
    return {
        int.from_bytes(socket.inet_aton(ip))
        for (ip,) in conn.execute(_SUBNET_ADDRESSES, {"subnet": subnet_id})
    }


def _set_groups(conn: Connection, port_id: str, group_ids: Sequence[str]) -> None:
    if group_ids:
        conn.execute(
            pg_t.insert(),
            [{"port_id": port_id, "security_group_id": g} for g in dict.fromkeys(group_ids)],
        )


def _get(conn: Connection, port_id: str) -> Port:
    found = _ports(conn, _PORT_BY_ID, {"port": port_id})
    if not found:
        raise NotFound("port", port_id)
    return found[0]


def _ports(conn: Connection, query: Any, params: dict[str, Any] | None = None) -> list[Port]:
    rows = conn.execute(query, params).all()
    groups = _groups_of_ports(conn, [row.id for row in rows])
    return [_port(row, groups.get(row.id, ())) for row in rows]


def _groups_of_ports(conn: Connection, port_ids: list[str]) -> dict[str, list[str]]:
    """The security groups of each of the ports (by port id); a port in none is left out."""
    groups: dict[str, list[str]] = {}
    if port_ids:
        for port_id, group_id in conn.execute(_GROUPS_OF_PORTS, {"ports": port_ids}):
            groups.setdefault(port_id, []).append(group_id)
    return groups


def _port(row: Row[Any], group_ids: Sequence[str]) -> Port:
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
        name=row.name,
        admin_state_up=row.admin_state_up,
        security_group_ids=tuple(sorted(group_ids)),
        description=row.description,
        updated_at=row.updated_at,
        interface_index=row.interface_index,
    )
