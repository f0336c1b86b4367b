"""The errors the API answers with, rendered in Zun's body.

Every error response, whatever raised it, has the body::

    {"errors": [{"request_id": "req-...", "code": "container.<hyphenated-name>", "status": 404,
                 "title": "...", "detail": "...", "links": []}]}

As in Zun, ``title`` and ``detail`` both carry the message of a client error (python-zunclient
shows ``title`` to its user); a server error says only that it happened and under which request id.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

_CAMEL_WORD = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


class ApiError(Exception):
    """An error answered to the client; subclasses set the status, the code comes from the name."""

    status: int = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def code(self) -> str:
        # Zun's form: the exception's name in lowercase words joined by hyphens.
        return "container." + _CAMEL_WORD.sub("-", type(self).__name__).lower()

    def extra_fields(self) -> dict[str, Any]:
        """Fields added to the error item beside the standard ones."""
        return {}


class Invalid(ApiError):
    status = 400


class InvalidValue(Invalid):
    """A query parameter or header value that is not allowed."""


class InvalidCapsuleTemplate(Invalid):
    pass


class RequestBodyTooLarge(Invalid):
    pass


class NotAuthenticated(ApiError):
    """No token, or one that proves nothing (any more)."""

    status = 401


class NotAuthorized(ApiError):
    status = 403


class PolicyNotAuthorized(NotAuthorized):
    pass


class OverQuota(ApiError):
    """A create that would take a project past one of its quotas (Zun's OverQuota)."""

    status = 403


class NotFound(ApiError):
    """A path that names no resource of this API."""

    status = 404


class CapsuleNotFound(NotFound):
    def __init__(self, ident: str) -> None:
        super().__init__(f"Capsule {ident} could not be found.")


class ContainerNotFound(NotFound):
    def __init__(self, ident: str) -> None:
        super().__init__(f"Container {ident} could not be found.")


class HostNotFound(NotFound):
    def __init__(self, ident: str) -> None:
        super().__init__(f"Host {ident} could not be found.")


class MethodNotAllowed(ApiError):
    status = 405


class MicroversionUnsupported(ApiError):
    status = 406

    def __init__(self, message: str, *, min_version: str, max_version: str) -> None:
        super().__init__(message)
        self.min_version = min_version
        self.max_version = max_version

    def extra_fields(self) -> dict[str, Any]:
        return {"min_version": self.min_version, "max_version": self.max_version}


class Conflict(ApiError):
    status = 409


class CapsuleAlreadyExists(Conflict):
    pass


class InvalidState(Conflict):
    pass


class ContainerAlreadyExists(Conflict):
    pass


class OperationNotSupported(ApiError):
    """An action of Zun's API that capsa's runtime (CRI) cannot carry out."""

    status = 501


class InternalServerError(ApiError):
    status = 500


class ComputeAgentError(ApiError):
    """The agent of a host answered, but not with what was asked."""

    status = 502


class ContainerHostNotUp(ApiError):
    """The agent of a host could not be reached."""

    status = 503


class IdentityUnavailable(ApiError):
    """The external Keystone that checks tokens could not be asked."""

    status = 503


class HttpError(ApiError):
    """Any other refusal of the HTTP layer, coded after its reason phrase."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason

    def code(self) -> str:
        return "container." + self.reason.lower().replace(" ", "-").replace("_", "-")


def error_body(
    *, request_id: str, code: str, status: int, message: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "request_id": request_id,
        "code": code,
        "status": status,
        "title": message,
        "detail": message,
        "links": [],
    }
    item.update(extra or {})
    return {"errors": [item]}


def error_response(error: ApiError, request_id: str) -> web.Response:
    body = error_body(
        request_id=request_id,
        code=error.code(),
        status=error.status,
        message=error.message,
        extra=error.extra_fields(),
    )
    return web.Response(
        status=error.status,
        text=json.dumps(body),
        content_type="application/json",
        headers=error.headers,
    )
