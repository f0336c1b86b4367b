"""A small client of capsa's API on the standard library's HTTP, so that ``capsa`` starts fast.

It talks to the API as any Zun client does: microversion 1.40, a token in ``X-Auth-Token`` (and,
for an API in noauth mode, the project in ``X-Project-Id``), Zun's error body turned into a
:class:`CliError` that carries the API's reason.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from capsa.cli.errors import CliError, ExitCode

API_VERSION = "container 1.40"
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    etag: str | None = None
    # Whether the API held the request for the wait it was asked for (RFC 7240).
    waited: bool = False

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass(frozen=True)
class Observed:
    """A resource as :meth:`ApiClient.observe` found it."""

    changed: bool
    # None once the resource is gone (404); the earlier body when nothing changed.
    resource: Any
    etag: str | None
    # Whether the next look should come after a pause: the API cannot wait for changes (no ETag,
    # or a 304 that did not wait) and would answer it at once.
    pause: bool


class ApiClient:
    """Calls the API at ``base_url`` (with or without a trailing ``/v1``)."""

    def __init__(
        self,
        base_url: str,
        project: str | None = None,
        timeout: float = 30.0,
        token: str | None = None,
    ) -> None:
        parts = urlsplit(base_url.rstrip("/").removesuffix("/v1"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CliError(f"{base_url!r} is not an http(s) URL of the API", ExitCode.USAGE)
        self.base_url = f"{parts.scheme}://{parts.netloc}{parts.path}"
        self._parts = parts
        self._project = project
        self._timeout = timeout
        self._token = token

    def get(self, path: str, query: dict[str, str] | None = None) -> Any:
        return self._expect(self.request("GET", path, query=query), 200).json()

    def get_or_none(self, path: str) -> Any:
        """The resource at ``path``, or None when the API answers 404."""
        response = self.request("GET", path)
        return None if response.status == 404 else self._expect(response, 200).json()

    def observe(self, path: str, seen: Observed | None, wait: int) -> Observed:
        """The resource at ``path`` once it differs from what ``seen`` saw: with its ETag, the API
        holds the request up to ``wait`` seconds for a change; 304 means none came."""
        headers = {}
        if seen is not None and seen.etag is not None:
            headers = {"If-None-Match": f'"{seen.etag}"', "Prefer": f"wait={wait}"}
        response = self.request("GET", path, headers=headers, timeout=self._timeout + wait)
        if response.status == 304 and seen is not None:
            return Observed(False, seen.resource, seen.etag, pause=not response.waited)
        resource = None if response.status == 404 else self._expect(response, 200).json()
        return Observed(True, resource, response.etag, pause=response.etag is None)

    def post(self, path: str, body: Any) -> Observed:
        """The resource that the POST made, as its answer gave it, with the ETag of its show when
        the API gives one (a client can then wait for its first change at once)."""
        response = self._expect(self.request("POST", path, body=body), 202)
        return Observed(True, response.json(), response.etag, pause=response.etag is None)

    def delete(self, path: str) -> None:
        self._expect(self.request("DELETE", path), 204)

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        with self._exchange(method, path, query, body, headers, timeout) as response:
            try:
                etag = response.getheader("ETag")
                return Response(
                    response.status,
                    response.read(),
                    etag.removeprefix("W/").strip('"') if etag else None,
                    response.getheader("Preference-Applied", "").startswith("wait="),
                )
            except (OSError, http.client.HTTPException) as exc:
                raise self._unreachable(exc) from exc

    @contextmanager
    def stream(self, path: str, query: dict[str, str]) -> Iterator[Iterator[bytes]]:
        """The body in chunks as they come, waiting as long as the server keeps it open."""
        with self._exchange("GET", path, query, None, follow=True) as response:
            if response.status != 200:
                raise _refused(Response(response.status, response.read()))
            yield iter(lambda: response.read1(_CHUNK), b"")

    @contextmanager
    def _exchange(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None,
        body: Any,
        extra_headers: dict[str, str] | None = None,
        timeout: float | None = None,
        follow: bool = False,
    ) -> Iterator[http.client.HTTPResponse]:
        connection_class = (
            http.client.HTTPSConnection
            if self._parts.scheme == "https"
            else http.client.HTTPConnection
        )
        connection = connection_class(
            self._parts.hostname or "", self._parts.port, timeout=timeout or self._timeout
        )
        url = f"{self._parts.path}{path}" + (f"?{urlencode(query)}" if query else "")
        headers = {"Accept": "application/json", "OpenStack-API-Version": API_VERSION}
        if self._project:
            headers["X-Project-Id"] = self._project
        if self._token:
            headers["X-Auth-Token"] = self._token
        headers.update(extra_headers or {})
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            try:
                connection.request(method, url, body=payload, headers=headers)
                response = connection.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise self._unreachable(exc) from exc
            if follow and connection.sock is not None:
                # A followed log may stay quiet for long: only connecting had a deadline.
                connection.sock.settimeout(None)
            yield response
        finally:
            connection.close()

    def _expect(self, response: Response, status: int) -> Response:
        if response.status != status:
            raise _refused(response)
        return response

    def _unreachable(self, exc: BaseException) -> CliError:
        reason = "timed out" if isinstance(exc, socket.timeout | TimeoutError) else str(exc)
        return CliError(
            f"cannot reach the capsa API at {self.base_url}: {reason or type(exc).__name__}",
            ExitCode.UNREACHABLE,
        )


def _refused(response: Response) -> CliError:
    """The API's reason from Zun's error body, or what the server sent."""
    try:
        error = response.json()["errors"][0]
        reason = error.get("detail") or error.get("title")
    except (ValueError, KeyError, IndexError, TypeError):
        reason = response.body.decode(errors="replace").strip()[:500]
    return CliError(f"the API refused the request (HTTP {response.status}): {reason}")
