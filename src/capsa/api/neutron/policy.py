"""Who may do what with network resources: every check of the Neutron API, in one place, so that
it can move to capsa's policy module.

- A project sees its own resources, and shared networks with their subnets; an admin sees all.
  A resource the caller may not see answers 404, as if it did not exist.
- A project changes only its own resources; a caller with only the ``reader`` role changes none.
- Only an admin sets ``shared``, or makes a resource for another project.
"""

from __future__ import annotations

from capsa.api.context import RequestContext
from capsa.api.neutron.errors import forbidden

READER_ROLE = "reader"
# Roles that may change resources of their project.
_WRITER_ROLES = frozenset({"admin", "member", "_member_"})


def may_see(context: RequestContext, owner: str, shared: bool = False) -> bool:
    return context.is_admin or shared or owner == context.project_id


def list_scope(context: RequestContext) -> str | None:
    """The project whose resources a list shows (with the shared ones); None: every project."""
    return None if context.is_admin else context.project_id


def check_write(context: RequestContext, action: str) -> None:
    """A caller with only reader roles cannot write."""
    if READER_ROLE in context.roles and not context.roles & _WRITER_ROLES:
        raise forbidden(f"rule:{action} is disallowed by policy: the caller is a reader")


def may_change(context: RequestContext, owner: str) -> bool:
    """Whether the caller may change a resource it can see (a shared network it does not own is
    visible, but not its to change)."""
    return context.is_admin or owner == context.project_id


def owner_for_create(context: RequestContext, asked: str | None, action: str) -> str:
    """The project a new resource belongs to: the caller's, or any an admin names."""
    if asked is None or asked == context.project_id:
        return context.project_id
    if not context.is_admin:
        raise forbidden(
            f"rule:{action} is disallowed by policy: only an admin creates a resource for "
            "another project"
        )
    return asked


def check_shared(context: RequestContext, action: str) -> None:
    if not context.is_admin:
        raise forbidden(f"rule:{action}:shared is disallowed by policy: only an admin shares")
