"""Reading what a request sends: its JSON body and its query parameters, each checked like Zun."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from capsa.api.errors import Invalid, InvalidValue, RequestBodyTooLarge
from capsa.model.capsule import Status

# oslo's strings for booleans, which Zun uses to read query parameters.
_TRUE = frozenset({"1", "t", "true", "on", "y", "yes"})
_FALSE = frozenset({"0", "f", "false", "off", "n", "no"})
_BOOLEAN_VALUES = ", ".join(sorted(_TRUE) + sorted(_FALSE))
# Status names as a waiting request may write them (Prefer: until-status), in any case.
_STATUS_BY_NAME = {status.value.lower(): status for status in Status}


async def read_json(request: web.Request, max_bytes: int) -> Any:
    """The request body as JSON; too large or not JSON is 400, naming the limit or the problem."""
    too_large = RequestBodyTooLarge(
        f"The request body is larger than the limit of {max_bytes} bytes (api.max_body_bytes)."
    )
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    if len(raw) > max_bytes:
        raise too_large
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Invalid(f"The request body is not valid JSON: {exc}") from None


def boolean(query: Mapping[str, str], name: str, default: bool) -> bool:
    value = query.get(name)
    if value is None:
        return default
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidValue(f"Invalid value {value!r} for {name}; valid values are: {_BOOLEAN_VALUES}")


def positive_limit(value: str | None, max_limit: int) -> int:
    """Zun's ``limit``: a positive integer, at most ``max_limit``, which is also the default."""
    if value is None:
        return max_limit
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise InvalidValue(f"Invalid limit {value!r}: limit must be a positive integer")
    return min(limit, max_limit)


def one_of(query: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = query.get(name, default)
    if value not in allowed:
        raise InvalidValue(f"Invalid {name} {value!r}; acceptable values are: {', '.join(allowed)}")
    return value


def refuse_unknown(query: Mapping[str, str], allowed: frozenset[str]) -> None:
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise InvalidValue(
            f"Unknown query parameter(s): {', '.join(unknown)}; "
            f"acceptable parameters are: {', '.join(sorted(allowed))}"
        )


def preferred_wait(request: web.Request, limit: float) -> float:
    """The seconds a request prefers to wait (RFC 7240's ``Prefer: wait=N``), at most ``limit``;
    0 without one. Like any preference, one that cannot be read is ignored."""
    seconds = _preferences(request).get("wait", "")
    if seconds.isascii() and seconds.isdigit():
        return min(float(seconds), limit)
    return 0.0


def preferred_statuses(request: web.Request) -> frozenset[Status] | None:
    """The statuses a waiting request wants to hear about (``Prefer: until-status=A|B``, capsa's
    own preference): its wait ends at a change only when the capsule has one of them (or is
    gone). None without one; like any preference, one naming an unknown status is ignored."""
    value = _preferences(request).get("until-status", "").strip('"')
    if not value:
        return None
    wanted = [_STATUS_BY_NAME.get(name.strip().lower()) for name in value.split("|")]
    if None in wanted:
        return None
    return frozenset(status for status in wanted if status is not None)


def _preferences(request: web.Request) -> dict[str, str]:
    """The request's preferences (RFC 7240) by lower-case name, each with its value (the first
    one given wins); their parameters are not read."""
    found: dict[str, str] = {}
    for header in request.headers.getall("Prefer", ()):
        for preference in header.split(","):
            name, _, value = preference.partition(";")[0].partition("=")
            found.setdefault(name.strip().lower(), value.strip())
    return found
