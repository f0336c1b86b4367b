"""Images on this host: pull policies, private registries' credentials, and one pull per image
(and credentials) however many capsules wait for it."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

from capsa.compute.errors import CapsuleFailed, classify
from capsa.cri import types as cri
from capsa.cri.client import CriClient, CriError
from capsa.log import get_logger
from capsa.model.capsule import PullPolicy
from capsa.model.registry import Registry
from capsa.secrets import SecretBox, SecretKeyMismatch
from capsa.store import Store

log = get_logger(__name__)

# What registries answer to credentials they refuse, or to none when they want some.
_REFUSALS = ("unauthorized", "authentication required")


class RegistryCredentials:
    """A private registry's current credentials, read and decrypted just before a pull."""

    def __init__(self, store: Store, secrets: SecretBox) -> None:
        self._store = store
        self._secrets = secrets

    async def lookup(self, registry_id: str, image: str) -> tuple[Registry, cri.ImageAuth]:
        registry = await self._store.registries.get(registry_id)
        if registry is None:
            raise CapsuleFailed(
                f"pulling image {image!r}: its private registry {registry_id} was deleted; "
                "create the capsule again once a registry for its domain exists"
            )
        try:
            token = registry.password_token
            password = self._secrets.decrypt(token) if token else ""
        except SecretKeyMismatch as exc:
            raise CapsuleFailed(f"pulling image {image!r}: {exc}") from None
        # The runtime sends the credentials to this host only, never to a mirror.
        auth = cri.ImageAuth(
            username=registry.username or "",
            password=password,
            server_address=f"https://{registry.server_host}",
        )
        return registry, auth


class ImagePuller:
    def __init__(self, cri_client: CriClient, credentials: RegistryCredentials | None = None):
        self._cri = cri_client
        self._credentials = credentials
        self._pulls: dict[tuple[str, cri.ImageAuth | None], asyncio.Task[str]] = {}

    async def ensure(
        self,
        image: str,
        policy: PullPolicy,
        capsule: str,
        registry_id: str | None = None,
        before_pull: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Makes ``image`` present as ``policy`` says, pulling with the credentials of the
        private registry ``registry_id`` if given (after awaiting ``before_pull``); raises
        CapsuleFailed or RetryLater."""
        try:
            if policy is not PullPolicy.ALWAYS and await self._cri.image_status(image):
                return
        except CriError as exc:
            raise classify(exc, f"checking image {image!r}") from exc
        if policy is PullPolicy.NEVER:
            raise CapsuleFailed(
                f"image {image!r} is not present on this host and its imagePullPolicy is Never"
            )
        registry, auth = None, None
        if registry_id is not None:
            if self._credentials is None:
                raise CapsuleFailed(f"pulling image {image!r}: this agent has no credentials")
            registry, auth = await self._credentials.lookup(registry_id, image)
        if before_pull is not None:
            await before_pull()
        await self._pull(image, auth, registry, capsule)

    async def _pull(
        self, image: str, auth: cri.ImageAuth | None, registry: Registry | None, capsule: str
    ) -> None:
        # Capsules that pull one image with other credentials must not share a pull: each must
        # be refused or let in on its own credentials.
        key = (image, auth)
        task = self._pulls.get(key)
        if task is None:
            task = asyncio.create_task(self._cri.pull_image(image, auth), name=f"pull {image}")
            self._pulls[key] = task
            task.add_done_callback(functools.partial(self._forget, key))
            log.info(
                "pulling image",
                image=image,
                capsule=capsule,
                registry=registry.uuid if registry else None,
            )
        try:
            # A capsule deleted while waiting must not cancel a pull that others share.
            ref = await asyncio.shield(task)
        except CriError as exc:
            if any(refusal in exc.message.lower() for refusal in _REFUSALS):
                raise CapsuleFailed(_refused(image, registry, exc.message)) from exc
            raise classify(exc, f"pulling image {image!r}") from exc
        log.info("image pulled", image=image, ref=ref, capsule=capsule)

    def _forget(self, key: tuple[str, cri.ImageAuth | None], task: asyncio.Task[str]) -> None:
        self._pulls.pop(key, None)
        # Every waiter may have been cancelled (capsules deleted): the failure is theirs, not news.
        if not task.cancelled():
            task.exception()


def _refused(image: str, registry: Registry | None, message: str) -> str:
    if registry is None:
        return (
            f"pulling image {image!r}: the registry requires credentials, and no private "
            f"registry of the project has its domain (create one with /v1/registries): {message}"
        )
    user = f"user {registry.username!r}" if registry.username else "no username"
    return (
        f"pulling image {image!r}: registry {registry.domain} refused the credentials of "
        f"private registry {registry.label} ({user}): {message}"
    )
