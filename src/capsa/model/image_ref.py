"""Image references as the OCI distribution grammar (and Docker's normalisation) define them.

``busybox`` means ``docker.io/library/busybox:latest``; a first component with a dot, a colon or
``localhost`` is a registry host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*"
    r"(?::[0-9]+)?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,}")
_MAX_NAME = 255


class InvalidImageReference(ValueError):
    pass


@dataclass(frozen=True)
class ImageReference:
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_image_reference(text: str) -> ImageReference:
    """Parses and normalises ``text``; raises InvalidImageReference saying what is wrong."""
    if not text or text != text.strip():
        raise InvalidImageReference("an image name must be non-empty, without surrounding spaces")
    rest, _, digest = text.partition("@")
    if digest and not _DIGEST.fullmatch(digest):
        raise InvalidImageReference(f"{digest!r} is not a valid digest (algorithm:hex)")
    name, tag = rest, None
    slash, colon = rest.rfind("/"), rest.rfind(":")
    if colon > slash:
        name, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidImageReference(
                f"{tag!r} is not a valid tag (letters, digits, '_', '.', '-'; at most 128)"
            )
    if len(name) > _MAX_NAME:
        raise InvalidImageReference(f"the image name is longer than {_MAX_NAME} characters")
    parts = name.split("/")
    if _names_host(parts):
        registry, path = parts[0], parts[1:]
        if not is_registry_host(registry):
            raise InvalidImageReference(f"{registry!r} is not a valid registry host")
    else:
        registry, path = DEFAULT_REGISTRY, parts
    for component in path:
        if not _COMPONENT.fullmatch(component):
            raise InvalidImageReference(
                f"{component!r} is not a valid repository name component "
                "(lowercase letters and digits, separated by '.', '_', '__' or '-')"
            )
    if registry == DEFAULT_REGISTRY and len(path) == 1:
        path = ["library", *path]
    if tag is None and not digest:
        tag = DEFAULT_TAG
    return ImageReference(registry, "/".join(path), tag, digest or None)


def explicit_registry(text: str) -> str | None:
    """The registry host that an image name spells out, or None (``busybox``, ``library/x``)."""
    parts = text.partition("@")[0].split("/")
    return parts[0] if _names_host(parts) else None


def is_registry_host(text: str) -> bool:
    """Whether ``text`` is a registry host as image names write it: ``name[.name...][:port]``."""
    return _DOMAIN.fullmatch(text) is not None


def _names_host(parts: list[str]) -> bool:
    first = parts[0]
    return len(parts) > 1 and ("." in first or ":" in first or first == "localhost")
