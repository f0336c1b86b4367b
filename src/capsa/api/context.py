"""Who is calling: project, user and roles, from the headers that identity will set later.

Until identity lands any ``X-Auth-Token`` is accepted; ``X-Project-Id``, ``X-User-Id`` and
``X-Roles`` (comma-separated) say who the caller is, with the configured defaults when absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from capsa.api.errors import PolicyNotAuthorized
from capsa.api.microversion import APIVersion
from capsa.config import ApiConfig

ADMIN_ROLE = "admin"


@dataclass(frozen=True)
class RequestContext:
    project_id: str
    user_id: str
    roles: frozenset[str]
    version: APIVersion

    @property
    def is_admin(self) -> bool:
        return ADMIN_ROLE in self.roles

    def project_scope(self, all_projects: bool, action: str) -> str | None:
        """The project a query is limited to; None (every project) only for admins who ask."""
        if not all_projects:
            return self.project_id
        if not self.is_admin:
            raise PolicyNotAuthorized(
                f"Policy doesn't allow {action} to be performed: all_projects needs the "
                f"{ADMIN_ROLE!r} role."
            )
        return None


def context_from_headers(
    headers: Mapping[str, str], api: ApiConfig, version: APIVersion
) -> RequestContext:
    roles = frozenset(
        role.strip().lower() for role in headers.get("X-Roles", "").split(",") if role.strip()
    )
    return RequestContext(
        project_id=headers.get("X-Project-Id") or api.default_project_id,
        user_id=headers.get("X-User-Id") or api.default_user_id,
        roles=roles,
        version=version,
    )
