"""A plain HTTP client of capsa's API, as a tenant's tool would be: http.client on a kept-alive
connection, in the caller's thread (never in capsa's event loop)."""

from __future__ import annotations

import http.client
import json
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import urlsplit

HEADERS = {
    "Content-Type": "application/json",
    "OpenStack-API-Version": "container 1.40",
}
# Well within the connection's timeout.
_LONGEST_WAIT_S = 30


class ApiError(RuntimeError):
    pass


class ApiClient:
    """One kept-alive connection; use one client per thread."""

    def __init__(self, base_url: str, token: str, timeout: float = 60.0) -> None:
        parts = urlsplit(base_url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"expected http://HOST:PORT, got {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port
        self._timeout = timeout
        self._headers = {**HEADERS, "X-Auth-Token": token}
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def raw(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """One request; the status and the whole body (read, not decoded)."""
        status, data, _ = self.exchange(method, path, body, headers)
        return status, data

    def exchange(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, http.client.HTTPMessage]:
        """One request; the status, the whole body and the response's headers."""
        data = json.dumps(body).encode() if body is not None else None
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self._host, self._port, self._timeout)
            try:
                self._conn.request(
                    method, path, body=data, headers={**self._headers, **(headers or {})}
                )
                response = self._conn.getresponse()
                return response.status, response.read(), response.headers
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The server closed an idle kept-alive connection: one new connection, once.
                self.close()
                if attempt == 2:
                    raise
            except BaseException:
                # A request cut short (a timeout, an interrupt) leaves the connection unusable.
                self.close()
                raise
        raise AssertionError("unreachable")

    def json(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        status, raw = self.raw(method, path, body, headers)
        return status, json.loads(raw) if raw else None

    def create_capsule(self, template: dict[str, Any]) -> Seen:
        """The new capsule, and the ETag that its show has until it changes."""
        status, raw, reply = self.exchange("POST", "/v1/capsules", {"template": template})
        if status != 202:
            raise ApiError(f"POST /v1/capsules answered {status}: {raw[:500]!r}")
        return Seen(json.loads(raw), reply["ETag"])

    def capsule(self, ident: str) -> dict[str, Any] | None:
        status, body = self.json("GET", f"/v1/capsules/{ident}")
        if status == 404:
            return None
        if status != 200:
            raise ApiError(f"GET /v1/capsules/{ident} answered {status}: {body}")
        return dict(body)

    def capsules(self) -> list[dict[str, Any]]:
        status, body = self.json("GET", "/v1/capsules?limit=1000")
        if status != 200:
            raise ApiError(f"GET /v1/capsules answered {status}: {body}")
        return list(body["capsules"])

    def delete_capsule(self, ident: str) -> None:
        status, body = self.json("DELETE", f"/v1/capsules/{ident}")
        if status not in (204, 404):
            raise ApiError(f"DELETE /v1/capsules/{ident} answered {status}: {body}")

    def create_port(self, port: dict[str, Any]) -> dict[str, Any]:
        """A new port of capsa's network service (Neutron's POST /ports)."""
        status, body = self.json("POST", "/networking/v2.0/ports", {"port": port})
        if status != 201:
            raise ApiError(f"POST /networking/v2.0/ports answered {status}: {body}")
        return dict(body["port"])

    def wait_until(self, ident: str, goal: Goal, timeout: float, seen: Seen | None = None) -> float:
        """Follows the capsule until it reaches ``goal``; returns when it first did, as
        time.perf_counter(). Every look is held by the API until the capsule has one of the
        goal's statuses or goes (Prefer: wait and until-status; If-None-Match with the ETag last
        seen, if any, from ``seen`` for the first look), so that the API answers once rather than
        at every step of the capsule's start or teardown. An Error status fails at once, with
        its reason."""
        deadline = time.perf_counter() + timeout
        path = f"/v1/capsules/{ident}"
        capsule = seen.capsule if seen is not None else None
        first_wait = min(_LONGEST_WAIT_S, math.ceil(timeout))
        waiting = _waiting(seen.etag if seen is not None else None, first_wait, goal)
        while True:
            status, raw, reply = self.exchange("GET", path, headers=waiting)
            answered = time.perf_counter()
            if status not in (200, 304, 404):
                raise ApiError(f"GET {path} answered {status}: {raw[:500]!r}")
            if status != 304:
                capsule = json.loads(raw) if status == 200 else None
            if goal.reached(capsule):
                return answered
            if capsule is None:
                raise ApiError(f"capsule {ident} is gone")
            if capsule.get("status") == "Error":
                raise ApiError(f"capsule {ident} failed: {capsule.get('status_reason')}")
            if answered > deadline:
                raise ApiError(f"capsule {ident} not done after {timeout:g}s: {capsule}")
            wait = min(_LONGEST_WAIT_S, math.ceil(deadline - answered))
            waiting = _waiting(reply["ETag"], wait, goal)


def _waiting(etag: str | None, seconds: int, goal: Goal) -> dict[str, str]:
    headers = {"Prefer": f"wait={seconds}, until-status={goal.statuses}"}
    if etag is not None:
        headers["If-None-Match"] = etag
    return headers


class Goal(NamedTuple):
    """What a client waits for a capsule to reach: ``reached(capsule, None once gone)``, and the
    statuses (``A|B``) at which the API is to answer it; Error among them, to fail at once."""

    reached: Callable[[dict[str, Any] | None], bool]
    statuses: str


class Seen(NamedTuple):
    """A capsule as an answer gave it, with the ETag of its show."""

    capsule: dict[str, Any]
    etag: str


def _is_running(capsule: dict[str, Any] | None) -> bool:
    return capsule is not None and capsule.get("status") == "Running"


def _is_gone(capsule: dict[str, Any] | None) -> bool:
    return capsule is None


RUNNING = Goal(_is_running, "Running|Error")
GONE = Goal(_is_gone, "Error")
