"""Zun's microversions: ``OpenStack-API-Version: container 1.N``, from 1.1 to 1.40.

No header means 1.1 and ``container latest`` means 1.40, as in Zun; anything else that does not
name a version in that range is 406.
"""

from __future__ import annotations

from dataclasses import dataclass

from capsa.api.errors import MicroversionUnsupported

SERVICE = "container"
HEADER = "OpenStack-API-Version"
MIN_HEADER = "OpenStack-API-Minimum-Version"
MAX_HEADER = "OpenStack-API-Maximum-Version"


@dataclass(frozen=True, order=True)
class APIVersion:
    major: int
    minor: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    @property
    def header_value(self) -> str:
        return f"{SERVICE} {self}"


MIN_VERSION = APIVersion(1, 1)
MAX_VERSION = APIVersion(1, 40)
# Capsules get their current shape (name, labels, restart_policy as a map) from 1.32 on.
CAPSULE_CURRENT_SHAPE = APIVersion(1, 32)
HOSTS_API = APIVersion(1, 4)

_RANGE = f"[{MIN_VERSION.header_value}, {MAX_VERSION.header_value}]"


def negotiate(header: str | None) -> APIVersion:
    """The version a request asks for; MicroversionUnsupported (406) when it cannot be served."""
    if header is None:
        return MIN_VERSION
    parts = header.split()
    if len(parts) != 2 or parts[0] != SERVICE:
        raise _unsupported(
            f"Invalid service type for {HEADER} header {header!r}: expected "
            f"'{SERVICE} <major>.<minor>' or '{SERVICE} latest'."
        )
    text = parts[1]
    if text.lower() == "latest":
        return MAX_VERSION
    numbers = text.split(".")
    if len(numbers) != 2 or not all(n.isdigit() for n in numbers):
        raise _unsupported(f"Invalid value {text!r} for {HEADER} header: expected <major>.<minor>.")
    version = APIVersion(int(numbers[0]), int(numbers[1]))
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise _unsupported(
            f"Version {version} was requested but is not supported by this service. "
            f"The supported version range is: {_RANGE}."
        )
    return version


def require(version: APIVersion, minimum: APIVersion) -> None:
    """Refuses (406) a request below the version that introduced the API it calls."""
    if version < minimum:
        raise _unsupported(
            f"Version {version} was requested but the requested API is not supported for this "
            f"version; it needs {minimum} or later."
        )


def response_headers(version: APIVersion) -> dict[str, str]:
    """The headers of every v1 response, for a request served at ``version``."""
    return {
        MIN_HEADER: MIN_VERSION.header_value,
        MAX_HEADER: MAX_VERSION.header_value,
        HEADER: version.header_value,
        "Vary": HEADER,
    }


def _unsupported(message: str) -> MicroversionUnsupported:
    return MicroversionUnsupported(
        message, min_version=str(MIN_VERSION), max_version=str(MAX_VERSION)
    )
