"""Tokens checked against an external Keystone (``auth.mode = "keystone"``).

capsa authenticates there as its service user (password, scoped to the service project) and asks
``GET /v3/auth/tokens`` who each client token stands for, as keystonemiddleware does. An answer is
believed for ``auth.cache_seconds`` (and never past the token's expiry), so that a disabled user or
a revoked token stops working within that short time; a refusal is not cached.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import aiohttp
import orjson

from capsa.config import AuthConfig
from capsa.identity.service import TokenInfo
from capsa.log import get_logger
from capsa.model.clock import utcnow
from capsa.model.identity import Principal

log = get_logger(__name__)

# Enough for every live token of a large cloud; the oldest answers go first beyond it.
_CACHE_SIZE = 10_000


class KeystoneUnavailable(Exception):
    """The external Keystone could not be asked, or refused capsa's own credentials."""


class KeystoneValidator:
    def __init__(self, auth: AuthConfig, timeout: float = 10.0) -> None:
        self._auth = auth
        self._url = auth.keystone_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._service_token: str | None = None
        self._service_lock = asyncio.Lock()
        # token -> (monotonic time until which the answer holds, the answer)
        self._cache: dict[str, tuple[float, TokenInfo]] = {}

    async def validate(self, token: str) -> TokenInfo | None:
        cached = self._cache.get(token)
        if cached is not None and cached[0] > time.monotonic() and cached[1].expires_at > utcnow():
            return cached[1]
        info = await self._ask(token)
        if info is None:
            self._cache.pop(token, None)
            return None
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[token] = (time.monotonic() + self._auth.cache_seconds, info)
        return info

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _ask(self, token: str) -> TokenInfo | None:
        for attempt in range(2):
            service_token = await self._service(renew=attempt > 0)
            status, body, _ = await self._exchange(
                "GET",
                "/auth/tokens?nocatalog",
                headers={"X-Auth-Token": service_token, "X-Subject-Token": token},
            )
            if status == 200:
                return _token_info(body["token"])
            if status == 401:
                # capsa's own token expired or was revoked: renew it once.
                continue
            if status in (403, 404):
                # 403: Keystone will not say (a token of no use here either).
                return None
            raise KeystoneUnavailable(f"Keystone answered {status} validating a token: {body}")
        raise KeystoneUnavailable("Keystone refuses capsa's service token even just renewed")

    async def _service(self, renew: bool) -> str:
        async with self._service_lock:
            if renew or self._service_token is None:
                self._service_token = await self._service_login()
            return self._service_token

    async def _service_login(self) -> str:
        auth = self._auth
        domain = {"name": auth.service_domain}
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": auth.service_user,
                            "domain": domain,
                            "password": auth.service_password,
                        }
                    },
                },
                "scope": {"project": {"name": auth.service_project, "domain": domain}},
            }
        }
        status, _, headers = await self._exchange("POST", "/auth/tokens", json=body)
        if status != 201 or "X-Subject-Token" not in headers:
            raise KeystoneUnavailable(
                f"Keystone at {self._url} refused capsa's service user {auth.service_user} "
                f"(HTTP {status}): check auth.service_user, auth.service_password and "
                "auth.service_project"
            )
        log.info("service token obtained", keystone=self._url, user=auth.service_user)
        return headers["X-Subject-Token"]

    async def _exchange(
        self, method: str, path: str, **kwargs: Any
    ) -> tuple[int, Any, dict[str, str]]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.request(method, self._url + path, **kwargs) as response:
                raw = await response.read()
                body = orjson.loads(raw) if raw else None
                return response.status, body, dict(response.headers)
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            raise KeystoneUnavailable(f"cannot ask Keystone at {self._url}: {exc}") from exc


def _token_info(token: dict[str, Any]) -> TokenInfo | None:
    """The principal of a Keystone token body; None for a token scoped to no project."""
    project = token.get("project")
    if not project:
        return None
    user = token["user"]
    return TokenInfo(
        principal=Principal(
            user_id=user["id"],
            user_name=user.get("name", ""),
            project_id=project["id"],
            project_name=project.get("name", ""),
            roles=frozenset(role["name"].lower() for role in token.get("roles", [])),
        ),
        issued_at=_time(token.get("issued_at") or token["expires_at"]),
        expires_at=_time(token["expires_at"]),
        audit_id=(token.get("audit_ids") or [""])[0],
    )


def _time(text: str) -> datetime:
    """Keystone's ``2026-01-01T00:00:00.000000Z`` as capsa's naive UTC."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).replace(tzinfo=None)
