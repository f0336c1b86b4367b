"""Who is calling: project, user and roles, and what the policy lets them do.

The middleware fills the context from the caller's token (``auth.mode`` local or keystone), or, in
the unsafe ``noauth`` mode, from the ``X-Project-Id``, ``X-User-Id`` and ``X-Roles`` headers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from capsa.api.errors import PolicyNotAuthorized
from capsa.api.microversion import APIVersion
from capsa.api.policy import Policy, rule_name
from capsa.config import ApiConfig
from capsa.model.identity import MEMBER, Principal


@dataclass(frozen=True)
class RequestContext:
    project_id: str
    user_id: str
    roles: frozenset[str]
    version: APIVersion
    policy: Policy = field(compare=False)

    def can(self, rule: str) -> bool:
        return self.policy.allows(rule, self.roles)

    def authorize(self, rule: str, action: str | None = None) -> None:
        """Raises Zun's 403 unless allowed, naming the action (Zun's name for it; by default the
        rule's) and the roles that would allow it."""
        if not self.can(rule):
            roles = ", ".join(sorted(self.policy.roles_for(rule))) or "none"
            raise PolicyNotAuthorized(
                f"Policy doesn't allow {action or rule_name(rule)} to be performed: it needs one "
                f"of the roles {roles} in the project."
            )

    def project_scope(
        self,
        all_projects: bool,
        action: str,
        rule: str = "capsule_all_projects",
    ) -> str | None:
        """The project a query is limited to; None (every project) only when the caller asks
        for it and ``rule`` (by default ``capsule_all_projects``) allows it (``action`` names it
        in a 403)."""
        if not all_projects:
            return self.project_id
        self.authorize(rule, action)
        return None


def context_from_principal(
    principal: Principal, version: APIVersion, policy: Policy
) -> RequestContext:
    return RequestContext(
        project_id=principal.project_id,
        user_id=principal.user_id,
        roles=principal.roles,
        version=version,
        policy=policy,
    )


def context_from_headers(
    headers: Mapping[str, str], api: ApiConfig, version: APIVersion, policy: Policy
) -> RequestContext:
    """noauth mode: the caller is who its headers say; without X-Roles, a member."""
    roles = frozenset(
        role.strip().lower() for role in headers.get("X-Roles", "").split(",") if role.strip()
    )
    return RequestContext(
        project_id=headers.get("X-Project-Id") or api.default_project_id,
        user_id=headers.get("X-User-Id") or api.default_user_id,
        roles=roles or frozenset({MEMBER}),
        version=version,
        policy=policy,
    )
