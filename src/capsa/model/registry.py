"""Private registries (Zun's ``/v1/registries``) and which one a container pulls its image from.

A registry belongs to a project: a domain (``host[:port]``, as image names write it) and,
optionally, a username and a password (kept encrypted; see capsa.secrets). A container pulls with
a registry's credentials when:

1. its template names the registry (a Zun container's ``registry``, by name or uuid): an image
   without a host then lives on the registry's domain (``app:1`` -> ``<domain>/app:1``), as in Zun,
   and an image on another host is refused, since the credentials would go to that host;
2. else a registry named by the Pod's ``imagePullSecrets`` has the image's host as its domain
   (the first that does, in their order), as in Kubernetes;
3. else a registry of the project has the image's host as its domain (the oldest, when several do).

The choice is made when the capsule is created and kept as the container's ``registry_id``; the
agent reads the registry's current credentials at each pull.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from capsa.model.image_ref import explicit_registry, parse_image_reference

# Docker Hub's name in image references, and the host that containerd talks to for it.
_DOCKER_HUB = "docker.io"
_DOCKER_HUB_HOST = "registry-1.docker.io"


@dataclass(frozen=True)
class Registry:
    uuid: str
    project_id: str
    user_id: str
    domain: str
    name: str | None = None
    username: str | None = None
    # The password as capsa.secrets encrypted it; never the password itself.
    password_token: str | None = field(default=None, repr=False)
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def label(self) -> str:
        """How messages name the registry."""
        return f"{self.name!r} ({self.uuid})" if self.name else self.uuid

    @property
    def server_host(self) -> str:
        """The host that the runtime sends the credentials to (and to no other)."""
        return _DOCKER_HUB_HOST if self.domain == _DOCKER_HUB else self.domain


class RegistryChoiceError(ValueError):
    """A template names a registry that cannot serve the container; the message says why."""


@dataclass(frozen=True)
class RegistryDirectory:
    """The registries of one project, oldest first, as a create request sees them."""

    registries: tuple[Registry, ...] = ()

    def find(self, ident: str) -> Registry:
        """The registry whose uuid or name is ``ident``."""
        for registry in self.registries:
            if ident in (registry.uuid, registry.name):
                return registry
        raise RegistryChoiceError(f"there is no registry {ident!r} in this project")

    def choose(
        self, image: str, named: Registry | None, pull_secrets: Sequence[Registry] = ()
    ) -> tuple[str, Registry | None]:
        """The image to pull and the registry whose credentials pull it (see the module)."""
        host = explicit_registry(image)
        if named is not None:
            if host is None:
                return f"{named.domain}/{image}", named
            if host.lower() != named.domain.lower():
                raise RegistryChoiceError(
                    f"image {image!r} is on {host}, not on the domain {named.domain} of "
                    f"registry {named.label}"
                )
            return image, named
        host = parse_image_reference(image).registry.lower()
        for registry in (*pull_secrets, *self.registries):
            if registry.domain.lower() == host:
                return image, registry
        return image, None
