"""``/v3``: the part of Keystone v3 that Zun and OpenStack clients use, served by capsa itself.

- ``GET /v3``: the version document keystoneauth reads first.
- ``POST /v3/auth/tokens``: the password method (or the token method, to change project), scoped
  to a project by id or name (or the user's default project): 201, the token in
  ``X-Subject-Token``, and a body with the user, project, roles, expiry and the catalog, which
  lists capsa's ``container`` (Zun), ``identity`` and ``network`` (Neutron) endpoints.
- ``GET`` / ``HEAD /v3/auth/tokens``: validates ``X-Subject-Token`` for the caller of
  ``X-Auth-Token`` (the token's own user, or an admin: a service validating its clients').
- ``DELETE /v3/auth/tokens``: revokes ``X-Subject-Token`` (its user, or an admin).

Errors have Keystone's body: ``{"error": {"code": 401, "title": "Unauthorized", "message": ...}}``.
capsa has one domain, ``default`` ("Default"); naming another refuses the request.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from http import HTTPStatus
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from capsa.api.auth import TOKEN_HEADER
from capsa.api.errors import ApiError
from capsa.api.keys import CONFIG, IDENTITY
from capsa.api.neutron.errors import PREFIX as NETWORK_PREFIX
from capsa.api.params import read_json
from capsa.api.schemas.template import describe_error
from capsa.api.views import json_response
from capsa.identity.service import AuthenticationFailed, IdentityService, TokenInfo
from capsa.model.identity import ADMIN, DEFAULT_DOMAIN_ID, DEFAULT_DOMAIN_NAME, REGION

SUBJECT_TOKEN_HEADER = "X-Subject-Token"

_IDENTITY_MEDIA_TYPE = "application/vnd.openstack.identity-v3+json"
_DOMAIN = {"id": DEFAULT_DOMAIN_ID, "name": DEFAULT_DOMAIN_NAME}
_ENDPOINT_NAMESPACE = uuid.UUID("5d1f5c0e-7d0b-4c5e-9a55-2b3b1c4a7f10")


class KeystoneError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _unauthorized(
    message: str = "The request you have made requires authentication.",
) -> KeystoneError:
    return KeystoneError(401, message)


Handler = Callable[[web.Request], Awaitable[web.Response]]


def keystone_errors(handler: Handler) -> Handler:
    """Answers a handler's refusals, and the API's own (a body too large), in Keystone's body."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except KeystoneError as exc:
            error = exc
        except ApiError as exc:
            error = KeystoneError(exc.status, exc.message)
        body = {
            "error": {
                "code": error.status,
                "title": HTTPStatus(error.status).phrase,
                "message": error.message,
            }
        }
        headers = {}
        if error.status == 401:
            headers["WWW-Authenticate"] = f'Keystone uri="{request.app[CONFIG].api_url}/v3"'
        return json_response(body, status=error.status, headers=headers)

    return wrapped


# ---- the request body of POST /v3/auth/tokens (extra keys are ignored, as Keystone does) ----


class _Named(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = Field(default=None, min_length=1, max_length=255)
    name: str | None = Field(default=None, min_length=1, max_length=255)

    @model_validator(mode="after")
    def _id_or_name(self) -> _Named:
        if self.id is None and self.name is None:
            raise ValueError("needs an id or a name")
        return self


class _Domain(_Named):
    pass


class _PasswordUser(_Named):
    domain: _Domain | None = None
    password: str = Field(max_length=4096)


class _Password(BaseModel):
    model_config = ConfigDict(extra="ignore")
    user: _PasswordUser


class _Token(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1, max_length=4096)


class _Identity(BaseModel):
    model_config = ConfigDict(extra="ignore")
    methods: list[str] = Field(min_length=1)
    password: _Password | None = None
    token: _Token | None = None


class _ProjectScope(_Named):
    domain: _Domain | None = None


class _Scope(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: _ProjectScope


class _Auth(BaseModel):
    model_config = ConfigDict(extra="ignore")
    identity: _Identity
    scope: _Scope | None = None


class _AuthRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    auth: _Auth


# ---- handlers ----


async def version(request: web.Request) -> web.Response:
    base_url = request.app[CONFIG].api_url
    return json_response(
        {
            "version": {
                "id": "v3.14",
                "status": "stable",
                "updated": "2020-04-07T00:00:00Z",
                "links": [{"rel": "self", "href": f"{base_url}/v3/"}],
                "media-types": [{"base": "application/json", "type": _IDENTITY_MEDIA_TYPE}],
            }
        }
    )


@keystone_errors
async def issue_token(request: web.Request) -> web.Response:
    identity = _identity(request)
    raw = await read_json(request, request.app[CONFIG].api.max_body_bytes)
    try:
        auth = _AuthRequest.model_validate(raw).auth
    except ValidationError as exc:
        problems = "; ".join(describe_error(e, "") for e in exc.errors())
        raise KeystoneError(400, f"Invalid authentication request: {problems}") from None
    project = None
    if auth.scope is not None:
        _check_domain(auth.scope.project.domain)
        project = auth.scope.project.id or auth.scope.project.name
    methods = auth.identity.methods
    try:
        if "password" in methods and auth.identity.password is not None:
            user = auth.identity.password.user
            _check_domain(user.domain)
            token, info = await identity.password_token(
                user.id or user.name or "", user.password, project
            )
        elif "token" in methods and auth.identity.token is not None:
            token, info = await identity.rescoped_token(auth.identity.token.id, project)
        else:
            raise KeystoneError(
                400, f"Unsupported authentication methods {methods}: use password or token."
            )
    except AuthenticationFailed as exc:
        raise _unauthorized(str(exc)) from None
    return json_response(
        _token_body(request, info, methods, catalog=True),
        status=201,
        headers={SUBJECT_TOKEN_HEADER: token},
    )


@keystone_errors
async def validate_token(request: web.Request) -> web.Response:
    caller, subject = await _caller_and_subject(request)
    if not (ADMIN in caller.principal.roles or caller.audit_id == subject.audit_id):
        raise KeystoneError(403, "Only the token's own holder or an admin may validate it.")
    catalog = "nocatalog" not in request.query
    response = json_response(
        _token_body(request, subject, ["token"], catalog),
        headers={SUBJECT_TOKEN_HEADER: request.headers[SUBJECT_TOKEN_HEADER]},
    )
    if request.method == "HEAD":
        return web.Response(status=200, headers=response.headers)
    return response


@keystone_errors
async def revoke_token(request: web.Request) -> web.Response:
    caller, subject = await _caller_and_subject(request)
    if not (
        ADMIN in caller.principal.roles or caller.principal.user_id == subject.principal.user_id
    ):
        raise KeystoneError(403, "Only the token's own user or an admin may revoke it.")
    await _identity(request).revoke(subject)
    return web.Response(status=204)


# ---- helpers ----


def _identity(request: web.Request) -> IdentityService:
    identity = request.app.get(IDENTITY)
    if identity is None:
        raise KeystoneError(
            404,
            "capsa's identity service is off (auth.mode is not 'local'): ask the Keystone "
            "that capsa uses.",
        )
    return identity


def _check_domain(domain: _Domain | None) -> None:
    if domain is not None and (domain.id or DEFAULT_DOMAIN_ID) != DEFAULT_DOMAIN_ID:
        raise _unauthorized(f"Domain {domain.id} does not exist: capsa has only 'default'.")
    if domain is not None and (domain.name or DEFAULT_DOMAIN_NAME) != DEFAULT_DOMAIN_NAME:
        raise _unauthorized(f"Domain {domain.name} does not exist: capsa has only 'Default'.")


async def _caller_and_subject(request: web.Request) -> tuple[TokenInfo, TokenInfo]:
    identity = _identity(request)
    caller_token = request.headers.get(TOKEN_HEADER)
    subject_token = request.headers.get(SUBJECT_TOKEN_HEADER)
    if not caller_token:
        raise _unauthorized()
    caller = await identity.validate(caller_token)
    if caller is None:
        raise _unauthorized("The token in X-Auth-Token is not valid.")
    if not subject_token:
        raise KeystoneError(400, "Name the token in the X-Subject-Token header.")
    subject = caller if subject_token == caller_token else await identity.validate(subject_token)
    if subject is None:
        raise KeystoneError(404, "Could not find token: it is not valid (any more).")
    return caller, subject


def _token_body(
    request: web.Request, info: TokenInfo, methods: list[str], catalog: bool
) -> dict[str, Any]:
    principal = info.principal
    token: dict[str, Any] = {
        "methods": methods,
        "user": {
            "id": principal.user_id,
            "name": principal.user_name,
            "domain": _DOMAIN,
            "password_expires_at": None,
        },
        "project": {"id": principal.project_id, "name": principal.project_name, "domain": _DOMAIN},
        "roles": [{"id": role, "name": role} for role in sorted(principal.roles)],
        "is_domain": False,
        "issued_at": _keystone_time(info.issued_at),
        "expires_at": _keystone_time(info.expires_at),
        "audit_ids": [info.audit_id],
    }
    if catalog:
        token["catalog"] = service_catalog(request.app[CONFIG].api_url)
    return {"token": token}


def service_catalog(base_url: str) -> list[dict[str, Any]]:
    """capsa's services as Keystone lists them, at the API's ``base_url``."""
    services = (
        ("container", "zun", f"{base_url}/v1"),
        ("identity", "keystone", f"{base_url}/v3"),
        # Neutron clients add /v2.0 to the network endpoint themselves.
        ("network", "neutron", f"{base_url}{NETWORK_PREFIX}"),
    )
    return [
        {
            "id": _stable_id(kind),
            "type": kind,
            "name": name,
            "endpoints": [
                {
                    "id": _stable_id(f"{kind}/{interface}/{url}"),
                    "interface": interface,
                    "region": REGION,
                    "region_id": REGION,
                    "url": url,
                }
                for interface in ("public", "internal", "admin")
            ],
        }
        for kind, name, url in services
    ]


def _stable_id(text: str) -> str:
    return uuid.uuid5(_ENDPOINT_NAMESPACE, text).hex


def _keystone_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000000Z")
