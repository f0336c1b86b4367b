"""The local identity service: passwords in, signed tokens out, and who a token stands for.

Every check of a token reads its user, project and roles from the store (one read), so that a
disabled user, a deleted or disabled project, a removed role or a revoked token stops working with
the next request; nothing is cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from capsa.identity.passwords import verify_password
from capsa.identity.tokens import TokenSigner
from capsa.log import get_logger
from capsa.model.identity import Principal
from capsa.store.identity import IdentityStore

log = get_logger(__name__)


class AuthenticationFailed(Exception):
    """Credentials that prove nothing; the message says what the caller can do about it, never
    which of user or password was wrong."""


@dataclass(frozen=True)
class TokenInfo:
    """A valid token: who it stands for, and its lifetime."""

    principal: Principal
    issued_at: datetime
    expires_at: datetime
    audit_id: str


class TokenValidator(Protocol):
    async def validate(self, token: str) -> TokenInfo | None:
        """Who ``token`` stands for now, or None when it proves nothing (any more)."""


class IdentityService:
    def __init__(self, store: IdentityStore, signer: TokenSigner, token_ttl: timedelta) -> None:
        self.store = store
        self._signer = signer
        self._ttl = token_ttl

    async def password_token(
        self, user: str, password: str, project: str | None
    ) -> tuple[str, TokenInfo]:
        """A token for ``user`` (id or name) scoped to ``project`` (id or name; None: the user's
        default project), if the password is right and the user holds a role there."""
        found = await self.store.user_with_password(user)
        valid = await verify_password(found[1] if found else None, password)
        if found is None or not valid or not found[0].enabled:
            log.info("authentication refused", user=user)
            raise AuthenticationFailed("The request you have made requires authentication.")
        account = found[0]
        return await self._scoped(account.id, account.name, project or account.default_project_id)

    async def rescoped_token(self, token: str, project: str | None) -> tuple[str, TokenInfo]:
        """A token for the user of ``token``, while it is valid, in ``project`` (id or name;
        None: the same project): Keystone's token method."""
        info = await self.validate(token)
        if info is None:
            raise AuthenticationFailed("The token to authenticate with is not valid.")
        principal = info.principal
        return await self._scoped(
            principal.user_id, principal.user_name, project or principal.project_id
        )

    async def _scoped(
        self, user_id: str, user_name: str, project: str | None
    ) -> tuple[str, TokenInfo]:
        """A token for a user already authenticated, in ``project`` (id or name)."""
        if project is None:
            raise AuthenticationFailed(
                f"User {user_name} has no default project: name a project to scope the token to."
            )
        found = await self.store.find_project(project)
        principal = None
        if found is not None:
            principal = await self.store.principal(user_id, found.id)
        if found is None or principal is None:
            log.info("scope refused", user=user_id, project=project)
            raise AuthenticationFailed(
                f"User {user_name} has no role on project {project}, or the project does not "
                "exist or is disabled."
            )
        token, claims = self._signer.issue(user_id, found.id, self._ttl)
        log.info("token issued", user=user_id, project=found.id, audit_id=claims.audit_id)
        return token, TokenInfo(principal, claims.issued_at, claims.expires_at, claims.audit_id)

    async def validate(self, token: str) -> TokenInfo | None:
        claims = self._signer.verify(token)
        if claims is None:
            return None
        principal = await self.store.principal(claims.user_id, claims.project_id, claims.audit_id)
        if principal is None:
            return None
        return TokenInfo(principal, claims.issued_at, claims.expires_at, claims.audit_id)

    async def revoke(self, info: TokenInfo) -> None:
        await self.store.revoke(info.audit_id, info.expires_at)
        log.info("token revoked", user=info.principal.user_id, audit_id=info.audit_id)
