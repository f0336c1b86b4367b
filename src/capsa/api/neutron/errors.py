"""Neutron's errors: ``{"NeutronError": {"type": ..., "message": ..., "detail": ""}}``.

The type is the name of the Neutron exception a client may test for (NetworkNotFound,
PortNotFound, NetworkInUse, IpAddressGenerationFailure, PolicyNotAuthorized, HTTPBadRequest...).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from capsa.api.errors import ApiError
from capsa.api.views import json_response
from capsa.log import get_logger

log = get_logger(__name__)

PREFIX = "/networking"


class NeutronError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


def bad_request(message: str) -> NeutronError:
    return NeutronError(400, "HTTPBadRequest", message)


def not_found(kind: str, ident: str) -> NeutronError:
    """``kind`` as Neutron names it: Network, Subnet, Port, SecurityGroup, SecurityGroupRule."""
    words = {"SecurityGroup": "Security group", "SecurityGroupRule": "Security group rule"}
    return NeutronError(
        404, f"{kind}NotFound", f"{words.get(kind, kind)} {ident} could not be found."
    )


def conflict(kind: str, message: str) -> NeutronError:
    return NeutronError(409, kind, message)


def forbidden(message: str) -> NeutronError:
    return NeutronError(403, "PolicyNotAuthorized", message)


def error_response(error: NeutronError) -> web.Response:
    body = {"NeutronError": {"type": error.kind, "message": error.message, "detail": ""}}
    return json_response(body, status=error.status)


def neutron_errors() -> Middleware:
    """Answers every failure under /networking in Neutron's shape (capsa's own API errors and
    aiohttp's refusals included); other paths pass through."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not (request.path == PREFIX or request.path.startswith(PREFIX + "/")):
            return await handler(request)
        try:
            return await handler(request)
        except NeutronError as exc:
            return error_response(exc)
        except ApiError as exc:
            kind = "HTTPBadRequest" if exc.status == 400 else type(exc).__name__
            return error_response(NeutronError(exc.status, kind, exc.message))
        except web.HTTPException as exc:
            if isinstance(exc, web.HTTPNotFound):
                message = f"The resource could not be found: {request.path}"
                return error_response(NeutronError(404, "HTTPNotFound", message))
            if isinstance(exc, web.HTTPMethodNotAllowed):
                message = f"The method {request.method} is not allowed for {request.path}"
                return error_response(NeutronError(405, "HTTPMethodNotAllowed", message))
            return error_response(NeutronError(exc.status, type(exc).__name__, exc.text or ""))

    return middleware
