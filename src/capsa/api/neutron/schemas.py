"""The bodies the Neutron API accepts, checked field by field: an unknown attribute or a value of
the wrong kind is a 400 that names it, as Neutron answers."""

from __future__ import annotations

import ipaddress
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from capsa.api.neutron.errors import bad_request

M = TypeVar("M", bound=BaseModel)

Name = Field(default=None, max_length=255)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class _Owned(_Body):
    project_id: str | None = Field(default=None, max_length=255)
    tenant_id: str | None = Field(default=None, max_length=255)

    def owner(self) -> str | None:
        if self.project_id and self.tenant_id and self.project_id != self.tenant_id:
            raise bad_request("project_id and tenant_id must be the same")
        return self.project_id or self.tenant_id


class NetworkCreate(_Owned):
    name: str = Field(default="", max_length=255)
    description: str = Field(default="", max_length=255)
    admin_state_up: bool = True
    shared: bool = False
    mtu: int | None = Field(default=None, ge=68, le=9000)
    port_security_enabled: Literal[True] = True


class NetworkUpdate(_Body):
    name: str | None = Name
    description: str | None = Name
    admin_state_up: bool | None = None
    shared: bool | None = None


class Pool(_Body):
    start: ipaddress.IPv4Address
    end: ipaddress.IPv4Address


class SubnetCreate(_Owned):
    network_id: str
    cidr: ipaddress.IPv4Network
    ip_version: Literal[4] = 4
    name: str = Field(default="", max_length=255)
    description: str = Field(default="", max_length=255)
    # Unset: the first host address; capsa's bridges always hold a gateway.
    gateway_ip: ipaddress.IPv4Address | None = None
    allocation_pools: list[Pool] = Field(default_factory=list)
    dns_nameservers: list[ipaddress.IPv4Address] = Field(default_factory=list, max_length=5)
    enable_dhcp: bool = True
    host_routes: list[Any] = Field(default_factory=list, max_length=0)


class SubnetUpdate(_Body):
    name: str | None = Name
    description: str | None = Name
    allocation_pools: list[Pool] | None = None
    dns_nameservers: list[ipaddress.IPv4Address] | None = Field(default=None, max_length=5)
    enable_dhcp: bool | None = None


class FixedIp(_Body):
    subnet_id: str | None = None
    ip_address: ipaddress.IPv4Address | None = None


class PortCreate(_Owned):
    network_id: str
    name: str = Field(default="", max_length=255)
    description: str = Field(default="", max_length=255)
    admin_state_up: bool = True
    mac_address: str | None = Field(default=None, pattern=r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
    fixed_ips: list[FixedIp] = Field(default_factory=list, max_length=1)
    device_id: str = Field(default="", max_length=255)
    device_owner: str = Field(default="", max_length=255)
    security_groups: list[str] | None = None
    port_security_enabled: Literal[True] = True
    # The host whose agents enforce and plug the port ("" or absent: none).
    binding_host_id: str = Field(default="", alias="binding:host_id", max_length=255)


class PortUpdate(_Body):
    name: str | None = Name
    description: str | None = Name
    admin_state_up: bool | None = None
    device_id: str | None = Name
    device_owner: str | None = Name
    security_groups: list[str] | None = None
    binding_host_id: str | None = Field(default=None, alias="binding:host_id", max_length=255)


class SecurityGroupCreate(_Owned):
    name: str = Field(default="", max_length=255)
    description: str = Field(default="", max_length=255)
    stateful: Literal[True] = True


class SecurityGroupUpdate(_Body):
    name: str | None = Name
    description: str | None = Name


class RuleCreate(_Owned):
    security_group_id: str
    direction: Literal["ingress", "egress"]
    ethertype: Literal["IPv4", "IPv6"] = "IPv4"
    protocol: str | int | None = None
    port_range_min: int | None = Field(default=None, ge=0, le=65535)
    port_range_max: int | None = Field(default=None, ge=0, le=65535)
    remote_ip_prefix: str | None = None
    remote_group_id: str | None = None
    remote_address_group_id: None = None
    description: str = Field(default="", max_length=255)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in ("any", ""):
            return None
        return value


def parse(model: type[M], body: Any, resource: str) -> M:
    """``body[resource]`` as ``model``; 400 naming what is wrong."""
    if not isinstance(body, dict) or not isinstance(body.get(resource), dict):
        raise bad_request(f"Resource body required: a JSON object with the key {resource!r}")
    if len(body) != 1:
        raise bad_request(f"Only the key {resource!r} is allowed in the body")
    try:
        return model.model_validate(body[resource])
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or resource
            if error["type"] == "extra_forbidden":
                problems.append(f"Unrecognized attribute(s) '{where}'")
            else:
                problems.append(f"Invalid input for {where}: {error['msg']}")
        raise bad_request("; ".join(problems)) from None
