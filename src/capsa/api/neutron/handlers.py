"""The Neutron v2.0 API under /networking/v2.0: networks, subnets, ports, security groups and
their rules, each listed (with filters and ``fields``), shown, created, updated and deleted as
Neutron does. Who may do what is decided in :mod:`capsa.api.neutron.policy`."""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar
from urllib.parse import urlencode

from aiohttp import web

from capsa.api.context import RequestContext
from capsa.api.keys import CONFIG, STORE
from capsa.api.middleware import CONTEXT
from capsa.api.neutron import policy, schemas, views
from capsa.api.neutron.errors import PREFIX, bad_request, conflict, forbidden, not_found
from capsa.api.params import read_json
from capsa.api.views import json_response
from capsa.log import get_logger
from capsa.model.network import (
    DEVICE_OWNER_CAPSULE,
    ICMP_PROTOCOLS,
    PORT_PROTOCOLS,
    PROTOCOL_NUMBERS,
    AllocationPool,
    Direction,
    EtherType,
    Network,
    Port,
    SecurityGroup,
    SecurityGroupRule,
    Subnet,
    default_pools,
)
from capsa.network.ipam import lowest_free_address, random_mac
from capsa.store import Store
from capsa.store.networks import Duplicate, InUse, NotFound, Overlap
from capsa.store.ports import AddressInUse, InvalidAddress, MacAddressInUse, SubnetFull

log = get_logger(__name__)

V2 = PREFIX + "/v2.0"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _context(request: web.Request) -> RequestContext:
    """The caller, who may use the network service at all (every request reads)."""
    context = request[CONTEXT]
    policy.check_read(context, f"{request.method} {request.path}")
    return context


def _store(request: web.Request) -> Store:
    return request.app[STORE]


async def _body(request: web.Request) -> Any:
    return await read_json(request, request.app[CONFIG].api.max_body_bytes)


def _one(
    resource: str, item: dict[str, Any], request: web.Request, status: int = 200
) -> web.Response:
    return json_response({resource: views.only_fields(item, request.query)}, status=status)


def _many(collection: str, items: list[dict[str, Any]], request: web.Request) -> web.Response:
    """A list as Neutron answers it: filtered, sorted, paged (with a ``next`` link while more
    items follow) and cut to ``fields``."""
    page, next_marker = views.sorted_page(views.filtered(items, request.query), request.query)
    body: dict[str, Any] = {collection: [views.only_fields(i, request.query) for i in page]}
    if next_marker is not None:
        query = [(k, v) for k, v in request.query.items() if k != "marker"]
        query.append(("marker", next_marker))
        href = f"{request.app[CONFIG].api_url}{request.path}?{urlencode(query)}"
        body[f"{collection}_links"] = [{"rel": "next", "href": href}]
    return json_response(body)


def _no_content() -> web.Response:
    return web.Response(status=204)


class _Owned(Protocol):
    @property
    def project_id(self) -> str: ...


OwnedT = TypeVar("OwnedT", bound=_Owned)


async def _visible(
    request: web.Request,
    get: Callable[[str], Awaitable[OwnedT]],
    kind: str,
    ident: str,
    shared: Callable[[OwnedT], bool] = lambda _: False,
) -> OwnedT:
    """The resource, if the caller may see it; Neutron's 404 otherwise, as if it did not exist."""
    try:
        item = await get(ident)
    except NotFound:
        raise not_found(kind, ident) from None
    if not policy.may_see(_context(request), item.project_id, shared(item)):
        raise not_found(kind, ident)
    return item


# ---- versions ----


async def versions(request: web.Request) -> web.Response:
    base = request.app[CONFIG].api_url
    link = {"href": f"{base}{V2}/", "rel": "self"}
    return json_response({"versions": [{"id": "v2.0", "status": "CURRENT", "links": [link]}]})


async def resources(request: web.Request) -> web.Response:
    base = request.app[CONFIG].api_url
    names = [
        ("network", "networks"),
        ("subnet", "subnets"),
        ("port", "ports"),
        ("security_group", "security-groups"),
        ("security_group_rule", "security-group-rules"),
    ]
    return json_response(
        {
            "resources": [
                {
                    "name": name,
                    "collection": collection,
                    "links": [{"href": f"{base}{V2}/{collection}", "rel": "self"}],
                }
                for name, collection in names
            ]
        }
    )


# The Neutron extensions whose attributes capsa's resources carry, for clients that check.
_EXTENSIONS = (
    ("security-group", "Security groups", "Security groups and their rules."),
    ("binding", "Port binding", "binding:host_id and binding:vif_type of ports."),
    ("provider", "Provider network", "provider:network_type and segmentation_id (the VNI)."),
    ("project-id", "Project id", "project_id beside tenant_id."),
    ("standard-attr-description", "Descriptions", "description of every resource."),
    ("standard-attr-timestamp", "Timestamps", "created_at and updated_at of every resource."),
    ("net-mtu", "Network MTU", "mtu of networks."),
    ("port-security", "Port security", "port_security_enabled, always true."),
)


async def list_extensions(request: web.Request) -> web.Response:
    extensions = [
        {"alias": alias, "name": name, "description": description, "links": [], "updated": ""}
        for alias, name, description in _EXTENSIONS
    ]
    return _many("extensions", extensions, request)


# ---- networks ----


async def _visible_network(request: web.Request, network_id: str) -> Network:
    def shared(network: Network) -> bool:
        return network.shared

    return await _visible(
        request, _store(request).networks.get_network, "Network", network_id, shared
    )


def _changeable(context: RequestContext, owner: str, kind: str, ident: str, action: str) -> None:
    policy.check_write(context, action)
    if not policy.may_change(context, owner):
        raise forbidden(f"rule:{action} is disallowed by policy on {kind} {ident}")


async def _network_view(request: web.Request, item: Network) -> dict[str, Any]:
    return views.network(item, await _store(request).networks.subnet_ids(item.id))


async def list_networks(request: web.Request) -> web.Response:
    store = _store(request)
    scope = policy.list_scope(_context(request))
    networks = await store.networks.list_networks(scope)
    subnets = await store.networks.list_subnets(scope)
    by_network: dict[str, list[str]] = {}
    for s in subnets:
        by_network.setdefault(s.network_id, []).append(s.id)
    return _many(
        "networks", [views.network(n, by_network.get(n.id, [])) for n in networks], request
    )


async def show_network(request: web.Request) -> web.Response:
    item = await _visible_network(request, request.match_info["ident"])
    return _one("network", await _network_view(request, item), request)


async def create_network(request: web.Request) -> web.Response:
    context = _context(request)
    policy.check_write(context, "create_network")
    body = schemas.parse(schemas.NetworkCreate, await _body(request), "network")
    owner = policy.owner_for_create(context, body.owner(), "create_network")
    if body.shared:
        policy.check_shared(context, "create_network")
    item = await _store(request).networks.create_network(
        project_id=owner,
        name=body.name,
        description=body.description,
        mtu=body.mtu or request.app[CONFIG].network.mtu,
        shared=body.shared,
        admin_state_up=body.admin_state_up,
    )
    log.info("network created", network=item.id, project=owner, vni=item.segmentation_id)
    return _one("network", views.network(item, []), request, status=201)


async def update_network(request: web.Request) -> web.Response:
    context = _context(request)
    item = await _visible_network(request, request.match_info["ident"])
    _changeable(context, item.project_id, "network", item.id, "update_network")
    body = schemas.parse(schemas.NetworkUpdate, await _body(request), "network")
    values = body.model_dump(exclude_none=True)
    if "shared" in values:
        policy.check_shared(context, "update_network")
    updated = await _store(request).networks.update_network(item.id, **values)
    return _one("network", await _network_view(request, updated), request)


async def delete_network(request: web.Request) -> web.Response:
    context = _context(request)
    item = await _visible_network(request, request.match_info["ident"])
    _changeable(context, item.project_id, "network", item.id, "delete_network")
    try:
        await _store(request).networks.delete_network(item.id)
    except InUse as exc:
        raise conflict("NetworkInUse", str(exc)) from None
    log.info("network deleted", network=item.id, project=item.project_id)
    return _no_content()


# ---- subnets ----


async def _visible_subnet(request: web.Request, subnet_id: str) -> tuple[Subnet, Network]:
    store = _store(request)
    try:
        item = await store.networks.get_subnet(subnet_id)
        network = await store.networks.get_network(item.network_id)
    except NotFound:
        raise not_found("Subnet", subnet_id) from None
    if not policy.may_see(_context(request), item.project_id, network.shared):
        raise not_found("Subnet", subnet_id)
    return item, network


def _check_pools(
    cidr: ipaddress.IPv4Network, gateway: ipaddress.IPv4Address, pools: list[schemas.Pool]
) -> tuple[AllocationPool, ...]:
    checked = sorted((AllocationPool(p.start, p.end) for p in pools), key=lambda p: p.start)
    hosts = default_pools(cidr, cidr.network_address)
    for pool in checked:
        if pool.start > pool.end:
            raise bad_request(f"Invalid allocation pool: {pool.start} is after {pool.end}")
        if not (hosts and hosts[0].start <= pool.start and pool.end <= hosts[-1].end):
            raise bad_request(
                f"The allocation pool {pool.start}-{pool.end} spans beyond the subnet cidr {cidr}."
            )
        if gateway in pool:
            raise bad_request(
                f"Gateway ip {gateway} conflicts with allocation pool {pool.start}-{pool.end}"
            )
    for before, after in itertools.pairwise(checked):
        if after.start <= before.end:
            raise bad_request(
                f"Found overlapping allocation pools: {before.start}-{before.end} and "
                f"{after.start}-{after.end}"
            )
    return tuple(checked)


async def list_subnets(request: web.Request) -> web.Response:
    subnets = await _store(request).networks.list_subnets(policy.list_scope(_context(request)))
    return _many("subnets", [views.subnet(s) for s in subnets], request)


async def show_subnet(request: web.Request) -> web.Response:
    item, _ = await _visible_subnet(request, request.match_info["ident"])
    return _one("subnet", views.subnet(item), request)


async def create_subnet(request: web.Request) -> web.Response:
    context = _context(request)
    policy.check_write(context, "create_subnet")
    body = schemas.parse(schemas.SubnetCreate, await _body(request), "subnet")
    network = await _visible_network(request, body.network_id)
    _changeable(context, network.project_id, "network", network.id, "create_subnet")
    owner = policy.owner_for_create(context, body.owner() or network.project_id, "create_subnet")
    cidr = body.cidr
    if cidr.prefixlen > 30:
        raise bad_request(f"Invalid input for cidr: {cidr} has no room for ports and a gateway")
    gateway = body.gateway_ip or cidr.network_address + 1
    if gateway not in cidr or gateway in (cidr.network_address, cidr.broadcast_address):
        raise bad_request(f"Gateway IP {gateway} is not a host address of subnet {cidr}")
    pools = _check_pools(cidr, gateway, body.allocation_pools)
    try:
        item = await _store(request).networks.create_subnet(
            network_id=network.id,
            project_id=owner,
            cidr=cidr,
            gateway_ip=gateway,
            name=body.name,
            description=body.description,
            allocation_pools=pools,
            dns_nameservers=[str(a) for a in body.dns_nameservers],
            enable_dhcp=body.enable_dhcp,
        )
    except Overlap as exc:
        raise bad_request(str(exc)) from None
    except NotFound:
        raise not_found("Network", network.id) from None
    log.info("subnet created", subnet=item.id, network=network.id, cidr=str(cidr))
    return _one("subnet", views.subnet(item), request, status=201)


async def update_subnet(request: web.Request) -> web.Response:
    context = _context(request)
    item, _ = await _visible_subnet(request, request.match_info["ident"])
    _changeable(context, item.project_id, "subnet", item.id, "update_subnet")
    body = schemas.parse(schemas.SubnetUpdate, await _body(request), "subnet")
    values = body.model_dump(exclude_none=True, exclude={"allocation_pools", "dns_nameservers"})
    if body.allocation_pools is not None:
        values["allocation_pools"] = _check_pools(item.cidr, item.gateway_ip, body.allocation_pools)
    if body.dns_nameservers is not None:
        values["dns_nameservers"] = [str(a) for a in body.dns_nameservers]
    updated = await _store(request).networks.update_subnet(item.id, **values)
    return _one("subnet", views.subnet(updated), request)


async def delete_subnet(request: web.Request) -> web.Response:
    context = _context(request)
    item, _ = await _visible_subnet(request, request.match_info["ident"])
    _changeable(context, item.project_id, "subnet", item.id, "delete_subnet")
    try:
        await _store(request).networks.delete_subnet(item.id)
    except InUse as exc:
        raise conflict("SubnetInUse", str(exc)) from None
    return _no_content()


# ---- ports ----


async def _visible_port(request: web.Request, port_id: str) -> Port:
    return await _visible(request, _store(request).ports.get, "Port", port_id)


async def _groups_of(request: web.Request, owner: str, refs: list[str] | None) -> list[str]:
    """The ids of the owner's groups ``refs`` names; None: the owner's default group."""
    store = _store(request)
    if refs is None:
        return [(await store.networks.ensure_default_group(owner)).id]
    ids = []
    for ref in dict.fromkeys(refs):
        try:
            group = await store.networks.get_security_group(ref)
        except NotFound:
            raise not_found("SecurityGroup", ref) from None
        if group.project_id != owner:
            raise not_found("SecurityGroup", ref)
        ids.append(group.id)
    return ids


async def list_ports(request: web.Request) -> web.Response:
    ports = await _store(request).ports.list_ports(policy.list_scope(_context(request)))
    return _many("ports", [views.port(p) for p in ports], request)


async def show_port(request: web.Request) -> web.Response:
    item = await _visible_port(request, request.match_info["ident"])
    return _one("port", views.port(item), request)


async def create_port(request: web.Request) -> web.Response:
    context = _context(request)
    policy.check_write(context, "create_port")
    body = schemas.parse(schemas.PortCreate, await _body(request), "port")
    network = await _visible_network(request, body.network_id)
    owner = policy.owner_for_create(context, body.owner(), "create_port")
    if not policy.may_change(context, network.project_id) and not network.shared:
        raise not_found("Network", network.id)
    _check_binding(context, "create_port", body.device_owner, bool(body.binding_host_id))
    groups = await _groups_of(request, owner, body.security_groups)
    fixed = body.fixed_ips[0] if body.fixed_ips else schemas.FixedIp()
    try:
        item = await _store(request).ports.create(
            network_id=network.id,
            project_id=owner,
            device_id=body.device_id,
            device_owner=body.device_owner,
            host=body.binding_host_id or None,
            pick_address=lowest_free_address,
            mac_address=random_mac,
            security_group_ids=groups,
            subnet_id=fixed.subnet_id,
            ip_address=fixed.ip_address,
            fixed_mac=body.mac_address.lower() if body.mac_address else None,
            name=body.name,
            description=body.description,
            admin_state_up=body.admin_state_up,
        )
    except SubnetFull as exc:
        raise conflict("IpAddressGenerationFailure", str(exc)) from None
    except MacAddressInUse as exc:
        raise conflict("MacAddressInUse", str(exc)) from None
    except AddressInUse as exc:
        raise conflict("IpAddressAlreadyAllocated", str(exc)) from None
    except InvalidAddress as exc:
        raise bad_request(str(exc)) from None
    except NotFound as exc:
        raise not_found("Subnet", exc.ident) from None
    log.info("port created", port=item.id, network=network.id, ip=str(item.ip_address))
    return _one("port", views.port(item), request, status=201)


async def update_port(request: web.Request) -> web.Response:
    context = _context(request)
    item = await _visible_port(request, request.match_info["ident"])
    _changeable(context, item.project_id, "port", item.id, "update_port")
    body = schemas.parse(schemas.PortUpdate, await _body(request), "port")
    values = body.model_dump(exclude_none=True, exclude={"security_groups", "binding_host_id"})
    if body.binding_host_id is not None:
        values["host"] = body.binding_host_id or None
    moved = {
        name: values[name]
        for name in ("device_id", "device_owner", "host")
        if name in values and values[name] != getattr(item, name)
    }
    if moved and await _held_by_capsule(request, item):
        raise conflict(
            "PortInUse",
            f"Port {item.id} belongs to capsule {item.device_id}: its "
            f"{', '.join(_API_NAMES.get(name, name) for name in moved)} follow the capsule.",
        )
    _check_binding(context, "update_port", moved.get("device_owner", ""), "host" in moved)
    groups = None
    if body.security_groups is not None:
        groups = await _groups_of(request, item.project_id, body.security_groups)
    updated = await _store(request).ports.update(item.id, security_group_ids=groups, **values)
    return _one("port", views.port(updated), request)


async def _held_by_capsule(request: web.Request, item: Port) -> bool:
    """Whether the port is a capsule's and the capsule is there: such a port follows its capsule.
    One whose capsule is gone (a port an admin made for it, or one left behind) is changed or
    deleted like any other port of its project."""
    if item.device_owner != DEVICE_OWNER_CAPSULE:
        return False
    return await _store(request).capsules.exists(item.device_id)


# The API's names of Port attributes, where they differ.
_API_NAMES = {"host": "binding:host_id"}


def _check_binding(
    context: RequestContext, action: str, device_owner: str, binds_host: bool
) -> None:
    """Binding a port to a host, or making it a capsule's, is an admin's (capsa's agents do it
    for the ports they allocate): a tenant's port named after another tenant's capsule must
    never become part of it."""
    if binds_host:
        policy.check_port_binding(context, action, "binding:host_id")
    if device_owner == DEVICE_OWNER_CAPSULE:
        policy.check_port_binding(context, action, "device_owner")


async def delete_port(request: web.Request) -> web.Response:
    context = _context(request)
    item = await _visible_port(request, request.match_info["ident"])
    _changeable(context, item.project_id, "port", item.id, "delete_port")
    if await _held_by_capsule(request, item):
        raise conflict(
            "PortInUse",
            f"Port {item.id} belongs to capsule {item.device_id}: it goes when the capsule is "
            "deleted.",
        )
    await _store(request).ports.delete(item.id)
    return _no_content()


# ---- security groups ----


async def _visible_group(request: web.Request, group_id: str) -> SecurityGroup:
    return await _visible(
        request, _store(request).networks.get_security_group, "SecurityGroup", group_id
    )


async def list_security_groups(request: web.Request) -> web.Response:
    context = _context(request)
    store = _store(request)
    # As in Neutron, a project has its default group as soon as it looks.
    await store.networks.ensure_default_group(context.project_id)
    groups = await store.networks.list_security_groups(policy.list_scope(context))
    return _many("security_groups", [views.security_group(g) for g in groups], request)


async def show_security_group(request: web.Request) -> web.Response:
    item = await _visible_group(request, request.match_info["ident"])
    return _one("security_group", views.security_group(item), request)


async def create_security_group(request: web.Request) -> web.Response:
    context = _context(request)
    policy.check_write(context, "create_security_group")
    body = schemas.parse(schemas.SecurityGroupCreate, await _body(request), "security_group")
    owner = policy.owner_for_create(context, body.owner(), "create_security_group")
    if body.name == "default":
        raise conflict(
            "SecurityGroupDefaultAlreadyExists", "Default security group already exists."
        )
    store = _store(request)
    await store.networks.ensure_default_group(owner)
    item = await store.networks.create_security_group(
        project_id=owner, name=body.name, description=body.description
    )
    log.info("security group created", security_group=item.id, project=owner)
    return _one("security_group", views.security_group(item), request, status=201)


async def update_security_group(request: web.Request) -> web.Response:
    context = _context(request)
    item = await _visible_group(request, request.match_info["ident"])
    _changeable(context, item.project_id, "security group", item.id, "update_security_group")
    body = schemas.parse(schemas.SecurityGroupUpdate, await _body(request), "security_group")
    if item.is_default and body.name not in (None, "default"):
        raise conflict(
            "SecurityGroupCannotUpdateDefault", "Updating default security group not allowed."
        )
    updated = await _store(request).networks.update_security_group(
        item.id, **body.model_dump(exclude_none=True)
    )
    return _one("security_group", views.security_group(updated), request)


async def delete_security_group(request: web.Request) -> web.Response:
    context = _context(request)
    item = await _visible_group(request, request.match_info["ident"])
    _changeable(context, item.project_id, "security group", item.id, "delete_security_group")
    if item.is_default and not policy.may_remove_default_group(context):
        raise conflict(
            "SecurityGroupCannotRemoveDefault", "Removing default security group not allowed."
        )
    try:
        await _store(request).networks.delete_security_group(item.id)
    except InUse as exc:
        raise conflict("SecurityGroupInUse", str(exc)) from None
    return _no_content()


# ---- security group rules ----


async def _visible_rule(request: web.Request, rule_id: str) -> SecurityGroupRule:
    return await _visible(request, _store(request).networks.get_rule, "SecurityGroupRule", rule_id)


async def list_rules(request: web.Request) -> web.Response:
    rules = await _store(request).networks.list_rules(policy.list_scope(_context(request)))
    return _many("security_group_rules", [views.rule(r) for r in rules], request)


async def show_rule(request: web.Request) -> web.Response:
    item = await _visible_rule(request, request.match_info["ident"])
    return _one("security_group_rule", views.rule(item), request)


def _checked_protocol(body: schemas.RuleCreate) -> tuple[str | None, int | None, int | None]:
    """The rule's protocol as stored, and its port range (a lone minimum means one port)."""
    protocol, low, high = body.protocol, body.port_range_min, body.port_range_max
    if protocol is None:
        if low is not None or high is not None:
            raise bad_request("Must also specify protocol if port range is given.")
        return None, None, None
    text = str(protocol).lower()
    if not (text.isdigit() and int(text) <= 255) and text not in PROTOCOL_NUMBERS:
        allowed = ", ".join(sorted(PROTOCOL_NUMBERS))
        raise bad_request(
            f"Security group rule protocol {protocol} not supported. Only protocol values "
            f"[{allowed}] and integer representations [0 to 255] are supported."
        )
    if text in PORT_PROTOCOLS:
        if low is not None and high is None:
            high = low
        if low is not None and high is not None and not 1 <= low <= high:
            raise bad_request(
                "For TCP/UDP protocols, port_range_min must be <= port_range_max and at least 1"
            )
    elif text in ICMP_PROTOCOLS:
        if low is None and high is not None:
            raise bad_request("ICMP code (port_range_max) is given without an ICMP type")
        if any(value is not None and value > 255 for value in (low, high)):
            raise bad_request(
                "Invalid ICMP type or code: port_range_min (type) and port_range_max (code) "
                "must be between 0 and 255"
            )
    elif low is not None or high is not None:
        raise bad_request(f"Port ranges are only supported with tcp, udp, sctp and icmp: {text}")
    return text, low, high


async def create_rule(request: web.Request) -> web.Response:
    context = _context(request)
    policy.check_write(context, "create_security_group_rule")
    body = schemas.parse(schemas.RuleCreate, await _body(request), "security_group_rule")
    group = await _visible_group(request, body.security_group_id)
    _changeable(context, group.project_id, "security group", group.id, "create_security_group_rule")
    protocol, port_min, port_max = _checked_protocol(body)
    if body.remote_ip_prefix is not None and body.remote_group_id is not None:
        raise bad_request("Only remote_ip_prefix or remote_group_id may be provided.")
    prefix = None
    if body.remote_ip_prefix is not None:
        try:
            prefix = ipaddress.ip_network(body.remote_ip_prefix, strict=False)
        except ValueError:
            raise bad_request(
                f"Invalid input for remote_ip_prefix: {body.remote_ip_prefix!r}"
            ) from None
        if f"IPv{prefix.version}" != body.ethertype:
            raise bad_request(
                f"Conflicting value ethertype {body.ethertype} for CIDR {body.remote_ip_prefix}"
            )
    if body.remote_group_id is not None:
        await _visible_group(request, body.remote_group_id)
    try:
        item = await _store(request).networks.create_rule(
            security_group_id=group.id,
            project_id=group.project_id,
            direction=Direction(body.direction),
            ethertype=EtherType(body.ethertype),
            protocol=protocol,
            port_range_min=port_min,
            port_range_max=port_max,
            remote_ip_prefix=prefix,
            remote_group_id=body.remote_group_id,
            description=body.description,
        )
    except Duplicate as exc:
        raise conflict("SecurityGroupRuleExists", str(exc)) from None
    log.info("security group rule created", rule=item.id, security_group=group.id)
    return _one("security_group_rule", views.rule(item), request, status=201)


async def delete_rule(request: web.Request) -> web.Response:
    context = _context(request)
    item = await _visible_rule(request, request.match_info["ident"])
    _changeable(
        context, item.project_id, "security group rule", item.id, "delete_security_group_rule"
    )
    await _store(request).networks.delete_rule(item.id)
    return _no_content()


def _crud(
    collection: str,
    list_: Handler,
    show: Handler,
    create: Handler,
    update: Handler | None,
    delete: Handler,
) -> tuple[tuple[str, str, Handler], ...]:
    item = f"{V2}/{collection}/{{ident}}"
    routes = [
        ("GET", f"{V2}/{collection}", list_),
        ("POST", f"{V2}/{collection}", create),
        ("GET", item, show),
        ("DELETE", item, delete),
    ]
    if update is not None:
        routes.append(("PUT", item, update))
    return tuple(routes)


ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", PREFIX, versions),
    ("GET", V2, resources),
    ("GET", f"{V2}/extensions", list_extensions),
    *_crud("networks", list_networks, show_network, create_network, update_network, delete_network),
    *_crud("subnets", list_subnets, show_subnet, create_subnet, update_subnet, delete_subnet),
    *_crud("ports", list_ports, show_port, create_port, update_port, delete_port),
    *_crud(
        "security-groups",
        list_security_groups,
        show_security_group,
        create_security_group,
        update_security_group,
        delete_security_group,
    ),
    # Neutron's rules cannot be changed, only replaced.
    *_crud("security-group-rules", list_rules, show_rule, create_rule, None, delete_rule),
)
