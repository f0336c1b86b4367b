"""Who a request comes from, per ``auth.mode``: a token checked by capsa's identity service or by
an external Keystone, or (``noauth``, unsafe) whatever the request's headers claim.

Every API but the version documents needs a valid ``X-Auth-Token``; a missing or invalid one is
answered 401 with ``WWW-Authenticate: Keystone uri=...`` (where to get a token), as
keystonemiddleware does in front of Zun.
"""

from __future__ import annotations

from aiohttp import web

from capsa.api.context import RequestContext, context_from_headers, context_from_principal
from capsa.api.errors import IdentityUnavailable, NotAuthenticated
from capsa.api.microversion import APIVersion
from capsa.api.policy import Policy
from capsa.config import Config
from capsa.identity.keystone import KeystoneUnavailable
from capsa.identity.service import TokenValidator

TOKEN_HEADER = "X-Auth-Token"


class Authenticator:
    def __init__(self, cfg: Config, validator: TokenValidator | None) -> None:
        """``validator`` checks tokens; None only in noauth mode."""
        self._api = cfg.api
        self.validator = validator
        self.policy = Policy(cfg.policy)
        auth_url = cfg.auth.keystone_url if cfg.auth.mode == "keystone" else f"{cfg.api_url}/v3"
        self._challenge = {"WWW-Authenticate": f'Keystone uri="{auth_url.rstrip("/")}"'}

    async def context(self, request: web.Request, version: APIVersion) -> RequestContext:
        if self.validator is None:
            return context_from_headers(request.headers, self._api, version, self.policy)
        token = request.headers.get(TOKEN_HEADER)
        if not token:
            raise NotAuthenticated(
                "Authentication required: send a token in X-Auth-Token (POST /v3/auth/tokens "
                "issues one).",
                headers=self._challenge,
            )
        try:
            info = await self.validator.validate(token)
        except KeystoneUnavailable as exc:
            raise IdentityUnavailable(f"Cannot check the token: {exc}") from None
        if info is None:
            raise NotAuthenticated(
                "The token in X-Auth-Token is not valid: it is malformed or expired, was "
                "revoked, or its user or project is disabled or gone, or holds no role there.",
                headers=self._challenge,
            )
        return context_from_principal(info.principal, version, self.policy)
