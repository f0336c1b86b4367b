"""Networks, subnets, security groups and their rules in the database.

Every method is one transaction (:meth:`Database.run_read` / :meth:`Database.run_write`). A
project's default network and default security group are made on demand by
:meth:`NetworkStore.ensure_project_defaults`; the unique ``default_for`` columns make two
concurrent first capsules of a project agree on one of each. Subnets never overlap one another,
whatever their network: the host routes between its networks' bridges, so two equal CIDRs could not
both be reached.
"""

from __future__ import annotations

import functools
import ipaddress
import uuid as uuidlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import bindparam, delete, func, or_, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError

from capsa.model.clock import utcnow
from capsa.model.network import (
    AllocationPool,
    Direction,
    EtherType,
    Network,
    SecurityGroup,
    SecurityGroupRule,
    Subnet,
)
from capsa.store import notify, schema
from capsa.store.db import Database

n_t = schema.networks
s_t = schema.subnets
p_t = schema.ports
g_t = schema.security_groups
r_t = schema.security_group_rules

# Read for every capsule a project starts (its defaults): built once, since building a statement
# cost more than running it.
_DEFAULT_NETWORK = select(n_t).where(n_t.c.default_for == bindparam("project"))
_DEFAULT_GROUP_ID = select(g_t.c.id).where(g_t.c.default_for == bindparam("project"))
_FIRST_SUBNET = (
    select(s_t).where(s_t.c.network_id == bindparam("network")).order_by(s_t.c.created_at)
)
_GROUP = select(g_t).where(g_t.c.id == bindparam("group"))
_GROUP_RULES = (
    select(r_t)
    .where(r_t.c.security_group_id == bindparam("group"))
    .order_by(r_t.c.created_at, r_t.c.id)
)
pg_t = schema.port_security_groups

T = TypeVar("T")

DEFAULT_NAME = "default"
DEFAULT_GROUP_DESCRIPTION = "Default security group"
_ATTEMPTS = 8


class NotFound(LookupError):
    def __init__(self, kind: str, ident: str) -> None:
        super().__init__(f"{kind} {ident} could not be found")
        self.kind = kind
        self.ident = ident


class InUse(Exception):
    """A resource that others still use (ports on a network, ports in a group...)."""


class Overlap(Exception):
    """A subnet whose CIDR overlaps another subnet's."""


class NoFreeCidr(Exception):
    """No room left in the pool that projects' default subnets come from."""


@dataclass(frozen=True)
class ProjectDefaults:
    network: Network
    subnet: Subnet
    security_group: SecurityGroup


class EnforcedStore:
    """A store of what the hosts' network agents enforce: every write wakes them."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def _write(self, work: Callable[[Connection], T]) -> T:
        """Runs a write transaction that wakes the network agents: what they enforce changed."""
        return await self._db.run_write(functools.partial(_waking_network_agents, work))

    def _write_blocking(self, work: Callable[[Connection], T]) -> T:
        """:meth:`_write` on the calling thread, which it blocks (see
        Database.run_write_blocking)."""
        return self._db.run_write_blocking(functools.partial(_waking_network_agents, work))


def _waking_network_agents(work: Callable[[Connection], T], conn: Connection) -> T:
    result = work(conn)
    notify.wake(conn, notify.NETWORK)
    return result


class NetworkStore(EnforcedStore):
    # ---- networks ----

    async def create_network(
        self,
        *,
        project_id: str,
        name: str,
        mtu: int,
        shared: bool = False,
        admin_state_up: bool = True,
        description: str = "",
    ) -> Network:
        def work(conn: Connection) -> Network:
            return _get_network(
                conn,
                _insert_network(
                    conn,
                    project_id=project_id,
                    name=name,
                    mtu=mtu,
                    shared=shared,
                    admin_state_up=admin_state_up,
                    description=description,
                    default_for=None,
                ),
            )

        return await self._write_retrying(work)

    async def get_network(self, network_id: str) -> Network:
        return await self._db.run_read(lambda conn: _get_network(conn, network_id))

    async def list_networks(self, project_id: str | None) -> list[Network]:
        """The networks ``project_id`` may see (its own and shared ones); None: every network."""
        query = select(n_t).order_by(n_t.c.created_at, n_t.c.id)
        if project_id is not None:
            query = query.where(or_(n_t.c.project_id == project_id, n_t.c.shared.is_(True)))

        def work(conn: Connection) -> list[Network]:
            return [network_from_row(row) for row in conn.execute(query)]

        return await self._db.run_read(work, long=True)

    async def update_network(self, network_id: str, **values: Any) -> Network:
        return await self._update(n_t, network_id, values, _get_network)

    async def delete_network(self, network_id: str) -> None:
        """Deletes the network and its subnets; refuses while it has ports."""

        def work(conn: Connection) -> None:
            _get_network(conn, network_id)
            if _count(conn, p_t.c.network_id == network_id):
                raise InUse(
                    f"Unable to complete operation on network {network_id}. There are one or "
                    "more ports still in use on the network."
                )
            conn.execute(delete(s_t).where(s_t.c.network_id == network_id))
            conn.execute(delete(n_t).where(n_t.c.id == network_id))

        await self._write(work)

    # ---- subnets ----

    async def create_subnet(
        self,
        *,
        network_id: str,
        project_id: str,
        cidr: ipaddress.IPv4Network,
        gateway_ip: ipaddress.IPv4Address,
        name: str = "",
        allocation_pools: Sequence[AllocationPool] = (),
        dns_nameservers: Sequence[str] = (),
        enable_dhcp: bool = True,
        description: str = "",
    ) -> Subnet:
        def work(conn: Connection) -> Subnet:
            _get_network(conn, network_id)
            subnet_id = _insert_subnet(
                conn,
                network_id=network_id,
                project_id=project_id,
                cidr=cidr,
                gateway_ip=gateway_ip,
                name=name,
                allocation_pools=allocation_pools,
                dns_nameservers=dns_nameservers,
                enable_dhcp=enable_dhcp,
                description=description,
            )
            return _get_subnet(conn, subnet_id)

        return await self._write(work)

    async def get_subnet(self, subnet_id: str) -> Subnet:
        return await self._db.run_read(lambda conn: _get_subnet(conn, subnet_id))

    async def list_subnets(self, project_id: str | None) -> list[Subnet]:
        """The subnets ``project_id`` may see: its own and those of shared networks."""
        query = select(s_t).order_by(s_t.c.created_at, s_t.c.id)
        if project_id is not None:
            shared = select(n_t.c.id).where(n_t.c.shared.is_(True))
            query = query.where(or_(s_t.c.project_id == project_id, s_t.c.network_id.in_(shared)))

        def work(conn: Connection) -> list[Subnet]:
            return [subnet_from_row(row) for row in conn.execute(query)]

        return await self._db.run_read(work, long=True)

    async def subnet_ids(self, network_id: str) -> list[str]:
        """The ids of the network's subnets, in the order of list_subnets."""
        query = (
            select(s_t.c.id)
            .where(s_t.c.network_id == network_id)
            .order_by(s_t.c.created_at, s_t.c.id)
        )
        return await self._db.run_read(lambda conn: list(conn.execute(query).scalars()))

    async def update_subnet(self, subnet_id: str, **values: Any) -> Subnet:
        if "allocation_pools" in values:
            values["allocation_pools"] = _pools_doc(values["allocation_pools"])
        if "dns_nameservers" in values:
            values["dns_nameservers"] = list(values["dns_nameservers"])
        if "gateway_ip" in values:
            values["gateway_ip"] = str(values["gateway_ip"])
        return await self._update(s_t, subnet_id, values, _get_subnet)

    async def delete_subnet(self, subnet_id: str) -> None:
        def work(conn: Connection) -> None:
            _get_subnet(conn, subnet_id)
            if _count(conn, p_t.c.subnet_id == subnet_id):
                raise InUse(
                    f"Unable to complete operation on subnet {subnet_id}: one or more ports "
                    "have an IP allocation from this subnet."
                )
            conn.execute(delete(s_t).where(s_t.c.id == subnet_id))

        await self._write(work)

    # ---- security groups ----

    async def create_security_group(
        self, *, project_id: str, name: str, description: str = ""
    ) -> SecurityGroup:
        """A new group with Neutron's rules of a new group: all egress, no ingress."""

        def work(conn: Connection) -> SecurityGroup:
            group_id = _insert_group(conn, project_id, name, description, default_for=None)
            _insert_egress_rules(conn, group_id, project_id)
            return _get_group(conn, group_id)

        return await self._write(work)

    async def get_security_group(self, group_id: str) -> SecurityGroup:
        return await self._db.run_read(lambda conn: _get_group(conn, group_id))

    async def list_security_groups(self, project_id: str | None) -> list[SecurityGroup]:
        query = select(g_t).order_by(g_t.c.created_at, g_t.c.id)
        rules = select(r_t).order_by(r_t.c.created_at, r_t.c.id)
        if project_id is not None:
            query = query.where(g_t.c.project_id == project_id)
            rules = rules.where(r_t.c.project_id == project_id)

        def work(conn: Connection) -> list[SecurityGroup]:
            by_group: dict[str, list[SecurityGroupRule]] = {}
            for row in conn.execute(rules):
                by_group.setdefault(row.security_group_id, []).append(rule_from_row(row))
            return [_group(row, by_group.get(row.id, [])) for row in conn.execute(query)]

        return await self._db.run_read(work, long=True)

    async def update_security_group(self, group_id: str, **values: Any) -> SecurityGroup:
        return await self._update(g_t, group_id, values, _get_group)

    async def delete_security_group(self, group_id: str) -> None:
        def work(conn: Connection) -> None:
            _get_group(conn, group_id)
            if _count(conn, pg_t.c.security_group_id == group_id, table=pg_t):
                raise InUse(f"Security Group {group_id} in use.")
            conn.execute(delete(r_t).where(r_t.c.security_group_id == group_id))
            conn.execute(delete(r_t).where(r_t.c.remote_group_id == group_id))
            conn.execute(delete(g_t).where(g_t.c.id == group_id))

        await self._write(work)

    async def resolve_security_groups(self, project_id: str, refs: Iterable[str]) -> list[str]:
        """The ids of the project's groups named (by id or name) in ``refs``; NotFound for one
        that names none, InUse... never. A name that several groups share is ambiguous."""
        wanted = list(dict.fromkeys(refs))

        def work(conn: Connection) -> list[str]:
            ids = []
            for ref in wanted:
                rows = conn.execute(
                    select(g_t.c.id).where(
                        g_t.c.project_id == project_id, or_(g_t.c.id == ref, g_t.c.name == ref)
                    )
                ).all()
                if not rows:
                    raise NotFound("security group", ref)
                if len(rows) > 1:
                    raise Ambiguous(f"several security groups of the project are named {ref!r}")
                ids.append(rows[0].id)
            return ids

        return await self._db.run_read(work)

    async def resolve_networks(self, project_id: str, refs: Sequence[str]) -> list[Network]:
        """The networks named (each by id or name) by ``refs`` that the project may use, in
        their order; NotFound or Ambiguous for the first that names none or several,
        RepeatedNetwork when two name the same one."""
        query = select(n_t).where(
            or_(n_t.c.project_id == project_id, n_t.c.shared.is_(True)),
            or_(n_t.c.id == bindparam("ref"), n_t.c.name == bindparam("ref")),
        )

        def work(conn: Connection) -> list[Network]:
            networks: list[Network] = []
            for ref in refs:
                rows = conn.execute(query, {"ref": ref}).all()
                if not rows:
                    raise NotFound("network", ref)
                if len(rows) > 1:
                    raise Ambiguous(f"several networks the project may use are named {ref!r}")
                network = network_from_row(rows[0])
                if any(n.id == network.id for n in networks):
                    raise RepeatedNetwork(f"network {network.id} is named more than once")
                networks.append(network)
            return networks

        return await self._db.run_read(work)

    # ---- rules ----

    async def create_rule(
        self,
        *,
        security_group_id: str,
        project_id: str,
        direction: Direction,
        ethertype: EtherType,
        protocol: str | None = None,
        port_range_min: int | None = None,
        port_range_max: int | None = None,
        remote_ip_prefix: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None,
        remote_group_id: str | None = None,
        description: str = "",
    ) -> SecurityGroupRule:
        def work(conn: Connection) -> SecurityGroupRule:
            _get_group(conn, security_group_id)
            if remote_group_id is not None:
                _get_group(conn, remote_group_id)
            values = {
                "security_group_id": security_group_id,
                "project_id": project_id,
                "direction": direction.value,
                "ethertype": ethertype.value,
                "protocol": protocol,
                "port_range_min": port_range_min,
                "port_range_max": port_range_max,
                "remote_ip_prefix": str(remote_ip_prefix) if remote_ip_prefix else None,
                "remote_group_id": remote_group_id,
            }
            duplicate = conn.execute(
                select(r_t.c.id).where(*(r_t.c[key] == value for key, value in values.items()))
            ).first()
            if duplicate is not None:
                raise Duplicate(f"Security group rule already exists. Rule id is {duplicate.id}.")
            rule_id = _insert_rule(conn, description=description, **values)
            return _get_rule(conn, rule_id)

        return await self._write(work)

    async def get_rule(self, rule_id: str) -> SecurityGroupRule:
        return await self._db.run_read(lambda conn: _get_rule(conn, rule_id))

    async def list_rules(self, project_id: str | None) -> list[SecurityGroupRule]:
        query = select(r_t).order_by(r_t.c.created_at, r_t.c.id)
        if project_id is not None:
            query = query.where(r_t.c.project_id == project_id)

        def work(conn: Connection) -> list[SecurityGroupRule]:
            return [rule_from_row(row) for row in conn.execute(query)]

        return await self._db.run_read(work, long=True)

    async def delete_rule(self, rule_id: str) -> None:
        def work(conn: Connection) -> None:
            _get_rule(conn, rule_id)
            conn.execute(delete(r_t).where(r_t.c.id == rule_id))

        await self._write(work)

    # ---- a project's defaults ----

    async def ensure_project_defaults(
        self, project_id: str, pool: ipaddress.IPv4Network, prefixlen: int, mtu: int
    ) -> ProjectDefaults:
        """The project's default network (with a subnet of ``prefixlen`` from ``pool``) and
        default security group, made if missing, safe to race. Once they exist (every capsule
        but a project's first) this is one read, not a write that would queue behind others."""
        existing = await self._db.run_read(lambda conn: _project_defaults(conn, project_id))
        if existing is not None:
            return existing

        def work(conn: Connection) -> ProjectDefaults:
            network = select(n_t.c.id).where(n_t.c.default_for == project_id)
            if conn.execute(network).first() is None:
                network_id = _insert_network(
                    conn,
                    project_id=project_id,
                    name=DEFAULT_NAME,
                    mtu=mtu,
                    shared=False,
                    admin_state_up=True,
                    description=f"The default network of project {project_id}",
                    default_for=project_id,
                )
                cidr = _free_cidr(conn, pool, prefixlen)
                _insert_subnet(
                    conn,
                    network_id=network_id,
                    project_id=project_id,
                    cidr=cidr,
                    gateway_ip=cidr.network_address + 1,
                    name=DEFAULT_NAME,
                )
            group = select(g_t.c.id).where(g_t.c.default_for == project_id)
            if conn.execute(group).first() is None:
                _insert_default_group(conn, project_id)
            made = _project_defaults(conn, project_id)
            if made is None:
                raise NotFound("subnet of the default network of project", project_id)
            return made

        return await self._write_retrying(work)

    async def ensure_default_group(self, project_id: str) -> SecurityGroup:
        """The project's default security group, made if missing (Neutron makes it when a
        project first lists or uses groups). Once it exists this is one read: every list of
        groups asks, and a write would wake every network agent."""
        existing = await self._db.run_read(lambda conn: _default_group(conn, project_id))
        if existing is not None:
            return existing

        def work(conn: Connection) -> SecurityGroup:
            made = _default_group(conn, project_id)
            return made or _get_group(conn, _insert_default_group(conn, project_id))

        return await self._write_retrying(work)

    # ---- helpers ----

    async def _write_retrying(self, work: Callable[[Connection], T]) -> T:
        """Runs ``work``; a unique constraint another transaction won first means try again
        (which then finds what the winner made)."""
        for attempt in range(_ATTEMPTS):
            try:
                return await self._write(work)
            except IntegrityError:
                if attempt == _ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def _update(
        self, table: Any, ident: str, values: dict[str, Any], get: Callable[[Connection, str], T]
    ) -> T:
        """Sets ``values`` on the row ``ident`` (NotFound, through ``get``, if there is none)."""

        def work(conn: Connection) -> T:
            get(conn, ident)
            if values:
                conn.execute(
                    update(table).where(table.c.id == ident).values(**values, updated_at=utcnow())
                )
            return get(conn, ident)

        return await self._write(work)


class Ambiguous(Exception):
    pass


class RepeatedNetwork(Exception):
    """A list of networks that names one network twice: a capsule has one port per network."""


class Duplicate(Exception):
    """A rule equal to one the group has (its message names that one)."""


# ---- in a transaction ----


def _project_defaults(conn: Connection, project_id: str) -> ProjectDefaults | None:
    """The project's default network, its first subnet and default group, if all exist."""
    network = conn.execute(_DEFAULT_NETWORK, {"project": project_id}).first()
    group = _default_group(conn, project_id)
    if network is None or group is None:
        return None
    subnet = conn.execute(_FIRST_SUBNET, {"network": network.id}).first()
    if subnet is None:
        return None
    return ProjectDefaults(network_from_row(network), subnet_from_row(subnet), group)


def _default_group(conn: Connection, project_id: str) -> SecurityGroup | None:
    row = conn.execute(_DEFAULT_GROUP_ID, {"project": project_id}).first()
    return _get_group(conn, row.id) if row else None


def _count(conn: Connection, condition: Any, table: Any = p_t) -> int:
    return int(conn.execute(select(func.count()).select_from(table).where(condition)).scalar_one())


def _insert_network(
    conn: Connection,
    *,
    project_id: str,
    name: str,
    mtu: int,
    shared: bool,
    admin_state_up: bool,
    description: str,
    default_for: str | None,
) -> str:
    now = utcnow()
    network_id = str(uuidlib.uuid4())
    # The next VNI; a concurrent insert that takes it too fails on the unique constraint.
    highest = conn.execute(select(func.max(n_t.c.segmentation_id))).scalar_one()
    conn.execute(
        n_t.insert().values(
            id=network_id,
            name=name,
            description=description,
            project_id=project_id,
            shared=shared,
            admin_state_up=admin_state_up,
            default_for=default_for,
            mtu=mtu,
            segmentation_id=(highest or 0) + 1,
            created_at=now,
            updated_at=now,
        )
    )
    return network_id


def _insert_subnet(
    conn: Connection,
    *,
    network_id: str,
    project_id: str,
    cidr: ipaddress.IPv4Network,
    gateway_ip: ipaddress.IPv4Address,
    name: str = "",
    allocation_pools: Sequence[AllocationPool] = (),
    dns_nameservers: Sequence[str] = (),
    enable_dhcp: bool = True,
    description: str = "",
) -> str:
    for other_id, other_cidr in conn.execute(select(s_t.c.id, s_t.c.cidr)):
        if cidr.overlaps(ipaddress.IPv4Network(other_cidr)):
            raise Overlap(
                f"Invalid input for operation: Requested subnet with cidr: {cidr} overlaps with "
                f"subnet {other_id} ({other_cidr}): capsa routes between all networks of a "
                "host, so no two subnets may overlap."
            )
    now = utcnow()
    subnet_id = str(uuidlib.uuid4())
    conn.execute(
        s_t.insert().values(
            id=subnet_id,
            network_id=network_id,
            project_id=project_id,
            name=name,
            description=description,
            cidr=str(cidr),
            gateway_ip=str(gateway_ip),
            allocation_pools=_pools_doc(allocation_pools),
            dns_nameservers=list(dns_nameservers),
            enable_dhcp=enable_dhcp,
            created_at=now,
            updated_at=now,
        )
    )
    return subnet_id


def _free_cidr(
    conn: Connection, pool: ipaddress.IPv4Network, prefixlen: int
) -> ipaddress.IPv4Network:
    taken = [ipaddress.IPv4Network(cidr) for (cidr,) in conn.execute(select(s_t.c.cidr))]
    for candidate in pool.subnets(new_prefix=prefixlen):
        if not any(candidate.overlaps(other) for other in taken):
            return candidate
    raise NoFreeCidr(
        f"no /{prefixlen} of {pool} is free for a project's default network: widen "
        "network.default_cidr or lengthen network.default_prefixlen"
    )


def _insert_group(
    conn: Connection, project_id: str, name: str, description: str, default_for: str | None
) -> str:
    now = utcnow()
    group_id = str(uuidlib.uuid4())
    conn.execute(
        g_t.insert().values(
            id=group_id,
            name=name,
            description=description,
            project_id=project_id,
            default_for=default_for,
            created_at=now,
            updated_at=now,
        )
    )
    return group_id


def _insert_default_group(conn: Connection, project_id: str) -> str:
    """Neutron's default group: all egress, ingress only from members of the group."""
    group_id = _insert_group(
        conn, project_id, DEFAULT_NAME, DEFAULT_GROUP_DESCRIPTION, default_for=project_id
    )
    _insert_egress_rules(conn, group_id, project_id)
    # Its members reach each other.
    _insert_rule_per_ethertype(conn, group_id, project_id, Direction.INGRESS, group_id)
    return group_id


def _insert_egress_rules(conn: Connection, group_id: str, project_id: str) -> None:
    """Neutron's egress rules of every new group: all traffic, of each ethertype."""
    _insert_rule_per_ethertype(conn, group_id, project_id, Direction.EGRESS)


def _insert_rule_per_ethertype(
    conn: Connection,
    group_id: str,
    project_id: str,
    direction: Direction,
    remote_group_id: str | None = None,
) -> None:
    for ethertype in EtherType:
        _insert_rule(
            conn,
            security_group_id=group_id,
            project_id=project_id,
            ethertype=ethertype.value,
            direction=direction.value,
            remote_group_id=remote_group_id,
        )


def _insert_rule(conn: Connection, *, description: str = "", **values: Any) -> str:
    now = utcnow()
    rule_id = str(uuidlib.uuid4())
    conn.execute(
        r_t.insert().values(
            id=rule_id, description=description, created_at=now, updated_at=now, **values
        )
    )
    return rule_id


def _get_network(conn: Connection, network_id: str) -> Network:
    return network_from_row(_get_row(conn, n_t, "network", network_id))


def _get_subnet(conn: Connection, subnet_id: str) -> Subnet:
    return subnet_from_row(_get_row(conn, s_t, "subnet", subnet_id))


def _get_group(conn: Connection, group_id: str) -> SecurityGroup:
    params = {"group": group_id}
    row = conn.execute(_GROUP, params).first()
    if row is None:
        raise NotFound("security group", group_id)
    return _group(row, [rule_from_row(r) for r in conn.execute(_GROUP_RULES, params)])


def _get_rule(conn: Connection, rule_id: str) -> SecurityGroupRule:
    return rule_from_row(_get_row(conn, r_t, "security group rule", rule_id))


def _get_row(conn: Connection, table: Any, kind: str, ident: str) -> Row[Any]:
    """The row of ``table`` whose id is ``ident``; NotFound(kind) if there is none."""
    row = conn.execute(select(table).where(table.c.id == ident)).first()
    if row is None:
        raise NotFound(kind, ident)
    return row


def _pools_doc(pools: Sequence[AllocationPool]) -> list[list[str]]:
    return [[str(p.start), str(p.end)] for p in pools]


def network_from_row(row: Row[Any]) -> Network:
    return Network(
        id=row.id,
        name=row.name,
        project_id=row.project_id,
        shared=row.shared,
        is_default=row.default_for is not None,
        mtu=row.mtu,
        segmentation_id=row.segmentation_id,
        admin_state_up=row.admin_state_up,
        description=row.description,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def subnet_from_row(row: Row[Any]) -> Subnet:
    return Subnet(
        id=row.id,
        network_id=row.network_id,
        project_id=row.project_id,
        cidr=ipaddress.IPv4Network(row.cidr),
        gateway_ip=ipaddress.IPv4Address(row.gateway_ip),
        name=row.name,
        allocation_pools=tuple(
            AllocationPool(ipaddress.IPv4Address(a), ipaddress.IPv4Address(b))
            for a, b in row.allocation_pools
        ),
        dns_nameservers=tuple(row.dns_nameservers),
        enable_dhcp=row.enable_dhcp,
        description=row.description,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _group(row: Row[Any], rules: Sequence[SecurityGroupRule]) -> SecurityGroup:
    return SecurityGroup(
        id=row.id,
        name=row.name,
        project_id=row.project_id,
        description=row.description,
        is_default=row.default_for is not None,
        rules=tuple(rules),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def rule_from_row(row: Row[Any]) -> SecurityGroupRule:
    return SecurityGroupRule(
        id=row.id,
        security_group_id=row.security_group_id,
        project_id=row.project_id,
        direction=Direction(row.direction),
        ethertype=EtherType(row.ethertype),
        protocol=row.protocol,
        port_range_min=row.port_range_min,
        port_range_max=row.port_range_max,
        remote_ip_prefix=ipaddress.ip_network(row.remote_ip_prefix)
        if row.remote_ip_prefix
        else None,
        remote_group_id=row.remote_group_id,
        description=row.description,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )
