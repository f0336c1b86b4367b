"""Network resources as Neutron shows them, and the filters and ``fields`` of Neutron's lists."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from multidict import MultiMapping

from capsa.api.neutron.errors import bad_request
from capsa.model.network import Network, Port, SecurityGroup, SecurityGroupRule, Subnet

# Query parameters of lists that are not filters.
_NOT_FILTERS = frozenset({"fields", "limit", "marker", "sort_key", "sort_dir", "page_reverse"})


def _time(value: datetime | None) -> str | None:
    # Neutron's form: 2024-05-01T12:00:00Z.
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


def _owned(project_id: str, created: datetime | None, updated: datetime | None) -> dict[str, Any]:
    return {
        "project_id": project_id,
        "tenant_id": project_id,
        "created_at": _time(created),
        "updated_at": _time(updated),
        "revision_number": 0,
        "tags": [],
    }


def network(item: Network, subnet_ids: Sequence[str]) -> dict[str, Any]:
    return {
        "id": item.id,
        "name": item.name,
        "description": item.description,
        "admin_state_up": item.admin_state_up,
        "shared": item.shared,
        "status": "ACTIVE",
        "subnets": list(subnet_ids),
        "mtu": item.mtu,
        "port_security_enabled": True,
        "router:external": False,
        "provider:network_type": "vxlan",
        "provider:physical_network": None,
        "provider:segmentation_id": item.segmentation_id,
        "availability_zone_hints": [],
        "availability_zones": [],
        "is_default": item.is_default,
        **_owned(item.project_id, item.created_at, item.updated_at),
    }


def subnet(item: Subnet) -> dict[str, Any]:
    return {
        "id": item.id,
        "name": item.name,
        "description": item.description,
        "network_id": item.network_id,
        "ip_version": 4,
        "cidr": str(item.cidr),
        "gateway_ip": str(item.gateway_ip),
        "allocation_pools": [{"start": str(p.start), "end": str(p.end)} for p in item.pools()],
        "dns_nameservers": list(item.dns_nameservers),
        "host_routes": [],
        "enable_dhcp": item.enable_dhcp,
        "ipv6_ra_mode": None,
        "ipv6_address_mode": None,
        "subnetpool_id": None,
        "service_types": [],
        **_owned(item.project_id, item.created_at, item.updated_at),
    }


def port(item: Port) -> dict[str, Any]:
    return {
        "id": item.id,
        "name": item.name,
        "description": item.description,
        "network_id": item.network_id,
        "admin_state_up": item.admin_state_up,
        "mac_address": item.mac_address,
        "fixed_ips": [{"subnet_id": item.subnet_id, "ip_address": str(item.ip_address)}],
        "device_id": item.device_id,
        "device_owner": item.device_owner,
        "status": item.status,
        "security_groups": list(item.security_group_ids),
        "port_security_enabled": True,
        "allowed_address_pairs": [],
        "binding:host_id": item.host or "",
        "binding:vif_type": "bridge" if item.host else "unbound",
        "binding:vnic_type": "normal",
        **_owned(item.project_id, item.created_at, item.updated_at),
    }


def rule(item: SecurityGroupRule) -> dict[str, Any]:
    return {
        "id": item.id,
        "security_group_id": item.security_group_id,
        "direction": item.direction.value,
        "ethertype": item.ethertype.value,
        "protocol": item.protocol,
        "port_range_min": item.port_range_min,
        "port_range_max": item.port_range_max,
        "remote_ip_prefix": str(item.remote_ip_prefix) if item.remote_ip_prefix else None,
        "remote_group_id": item.remote_group_id,
        "remote_address_group_id": None,
        "description": item.description,
        **_owned(item.project_id, item.created_at, item.updated_at),
    }


def security_group(item: SecurityGroup) -> dict[str, Any]:
    return {
        "id": item.id,
        "name": item.name,
        "description": item.description,
        "stateful": True,
        "shared": False,
        "security_group_rules": [rule(r) for r in item.rules],
        **_owned(item.project_id, item.created_at, item.updated_at),
    }


def only_fields(item: dict[str, Any], query: MultiMapping[str]) -> dict[str, Any]:
    """``fields=a&fields=b``: only those attributes."""
    fields = [f for value in query.getall("fields", []) for f in value.split(",") if f]
    return {k: v for k, v in item.items() if k in fields} if fields else item


def filtered(items: list[dict[str, Any]], query: MultiMapping[str]) -> list[dict[str, Any]]:
    """The items that match every filter of ``query``; several values of one filter match any.
    A filter that names no attribute is a 400, as in Neutron."""
    filters: dict[str, list[str]] = {}
    for key, value in query.items():
        if key not in _NOT_FILTERS:
            filters.setdefault(key, []).append(value)
    if items:
        unknown = sorted(k for k in filters if k not in items[0])
        if unknown:
            raise bad_request(f"{', '.join(unknown)} is invalid attribute for filtering")
    return [item for item in items if all(_matches(item[k], v) for k, v in filters.items())]


def sorted_page(
    items: list[dict[str, Any]], query: MultiMapping[str]
) -> tuple[list[dict[str, Any]], str | None]:
    """Neutron's ``sort_key``/``sort_dir`` (pairs, repeatable), then ``marker`` (the id after
    which the page starts) and ``limit``; returns the page and the marker of the next one, if
    more items follow."""
    keys = query.getall("sort_key", [])
    directions = query.getall("sort_dir", [])
    if len(directions) > len(keys):
        raise bad_request("The number of sort_keys and sort_dirs must be same")
    for key, direction in reversed(list(itertools.zip_longest(keys, directions))):
        if items and key not in items[0]:
            raise bad_request(f"{key} is invalid attribute for sort_key")
        if direction not in (None, "asc", "desc"):
            raise bad_request(f"{direction} is invalid value for sort_dir")
        items = sorted(items, key=lambda i: _sort_key(i[key]), reverse=direction == "desc")
    marker = query.get("marker")
    if marker is not None:
        ids = [i.get("id") for i in items]
        if marker not in ids:
            raise bad_request(f"Marker {marker} could not be found")
        items = items[ids.index(marker) + 1 :]
    limit = query.get("limit")
    if limit is None:
        return items, None
    if not limit.isdigit():
        raise bad_request(f"Invalid limit {limit!r}: it must be an integer of 0 or more")
    if int(limit) == 0 or len(items) <= int(limit):
        return items, None
    page = items[: int(limit)]
    return page, str(page[-1]["id"])


def _sort_key(value: Any) -> tuple[bool, str]:
    # None sorts first, as in SQL's ascending order on most databases.
    return (value is not None, _text(value))


def _matches(value: Any, wanted: list[str]) -> bool:
    if isinstance(value, list):
        return any(_element_matches(element, w) for element in value for w in wanted)
    return any(_text(value) == _text(w) for w in wanted)


def _element_matches(element: Any, wanted: str) -> bool:
    if isinstance(element, Mapping):
        # fixed_ips=ip_address=10.0.0.5 or fixed_ips=subnet_id=...
        key, _, expected = wanted.partition("=")
        return str(element.get(key)) == expected
    return str(element) == wanted


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    text = str(value)
    return text.lower() if text.lower() in ("true", "false") else text
