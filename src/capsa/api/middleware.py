"""What every request goes through: a request id, microversion negotiation, the caller's context,
and Zun's error body for whatever goes wrong (unknown paths and methods included).

Response headers are added when a response is prepared, so that streamed responses carry them too.
"""

from __future__ import annotations

import uuid

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from capsa.api import microversion
from capsa.api.auth import Authenticator
from capsa.api.context import RequestContext
from capsa.api.errors import (
    ApiError,
    HttpError,
    InternalServerError,
    MethodNotAllowed,
    NotFound,
    error_response,
)
from capsa.log import get_logger

log = get_logger(__name__)

CONTEXT = web.RequestKey("context", RequestContext)
_REQUEST_ID = web.RequestKey("request_id", str)
_VERSION_HEADERS = web.RequestKey("version_headers", dict[str, str])


# The version documents clients read before they authenticate.
_PUBLIC = frozenset({"/v1", "/v1/", "/networking", "/networking/"})


def _is_v1(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def _is_networking(path: str) -> bool:
    return path == "/networking" or path.startswith("/networking/")


def api_middleware(authenticator: Authenticator) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = f"req-{uuid.uuid4()}"
        request[_REQUEST_ID] = request_id
        try:
            if _is_v1(request.path):
                # A request whose version cannot be served is answered as at the minimum.
                request[_VERSION_HEADERS] = microversion.response_headers(microversion.MIN_VERSION)
                version = microversion.negotiate(request.headers.get(microversion.HEADER))
                request[_VERSION_HEADERS] = microversion.response_headers(version)
                if request.path not in _PUBLIC:
                    request[CONTEXT] = await authenticator.context(request, version)
            elif _is_networking(request.path) and request.path not in _PUBLIC:
                # The network service (Neutron's API) has no microversions.
                request[CONTEXT] = await authenticator.context(request, microversion.MIN_VERSION)
            return await handler(request)
        except ApiError as exc:
            return error_response(exc, request_id)
        except web.HTTPException as exc:
            return error_response(_from_http_exception(exc, request), request_id)
        except Exception:
            log.exception(
                "request failed", request_id=request_id, method=request.method, path=request.path
            )
            error = InternalServerError(
                "Your request could not be handled because of a problem in the server. "
                f"Error Correlation id is: {request_id}"
            )
            return error_response(error, request_id)

    return middleware


async def add_response_headers(request: web.Request, response: web.StreamResponse) -> None:
    request_id = request.get(_REQUEST_ID)
    if request_id is not None:
        response.headers["x-openstack-request-id"] = request_id
    response.headers.update(request.get(_VERSION_HEADERS, {}))


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> ApiError:
    """aiohttp's own refusals (no such path, wrong method, ...) as capsa errors."""
    if isinstance(exc, web.HTTPNotFound):
        return NotFound(f"The resource could not be found: {request.path}")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return MethodNotAllowed(
            f"The method {request.method} is not allowed for {request.path}; allowed: {allowed}",
            headers={"Allow": allowed},
        )
    return HttpError(exc.status, exc.reason, exc.text or exc.reason)
