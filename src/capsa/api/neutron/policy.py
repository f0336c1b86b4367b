"""Who may do what with network resources, on capsa's policy rules (:mod:`capsa.api.policy`):

- ``network_get``: every request of the network service (lists, shows);
- ``network_change``: creating, updating and deleting in the caller's project;
- ``network_all_projects``: seeing and changing every project's resources, and making them for
  another project;
- ``network_shared``: setting a network's ``shared``;
- ``network_port_binding``: setting a port's ``binding:host_id``, and giving a port the device
  owner of capsa's own capsule ports (``compute:capsule``), as Neutron keeps port bindings to
  its admins.

A project sees its own resources, and shared networks with their subnets. A resource the caller
may not see answers 404, as if it did not exist; one it sees but may not change (another
project's shared network) answers 403. The errors are Neutron's.
"""

from __future__ import annotations

from capsa.api.context import RequestContext
from capsa.api.neutron.errors import forbidden


def _require(context: RequestContext, rule: str, action: str, why: str) -> None:
    if not context.can(rule):
        raise forbidden(f"rule:{action} is disallowed by policy ({rule}): {why}")


def check_read(context: RequestContext, action: str) -> None:
    _require(context, "network_get", action, "the caller's roles may not read networks")


def check_write(context: RequestContext, action: str) -> None:
    _require(context, "network_change", action, "the caller's roles may not change networks")


def may_see(context: RequestContext, owner: str, shared: bool = False) -> bool:
    return shared or owner == context.project_id or context.can("network_all_projects")


def list_scope(context: RequestContext) -> str | None:
    """The project whose resources a list shows (with the shared ones); None: every project."""
    return None if context.can("network_all_projects") else context.project_id


def may_change(context: RequestContext, owner: str) -> bool:
    """Whether the caller may change a resource it can see (a shared network it does not own is
    visible, but not its to change)."""
    return owner == context.project_id or context.can("network_all_projects")


def owner_for_create(context: RequestContext, asked: str | None, action: str) -> str:
    """The project a new resource belongs to: the caller's, or any that an allowed caller
    names."""
    if asked is None or asked == context.project_id:
        return context.project_id
    _require(context, "network_all_projects", action, "only an admin creates for another project")
    return asked


def check_shared(context: RequestContext, action: str) -> None:
    _require(context, "network_shared", f"{action}:shared", "only an admin shares a network")


def may_remove_default_group(context: RequestContext) -> bool:
    return context.can("network_all_projects")


def check_port_binding(context: RequestContext, action: str, attribute: str) -> None:
    _require(
        context,
        "network_port_binding",
        f"{action}:{attribute}",
        "only an admin binds a port to a host or a capsule",
    )
