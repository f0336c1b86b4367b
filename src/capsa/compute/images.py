"""Images on this host: pull policies, and one pull per image however many capsules wait for it."""

from __future__ import annotations

import asyncio
import functools

from capsa.compute.errors import CapsuleFailed, classify
from capsa.cri.client import CriClient, CriError
from capsa.log import get_logger
from capsa.model.capsule import PullPolicy

log = get_logger(__name__)


class ImagePuller:
    def __init__(self, cri: CriClient) -> None:
        self._cri = cri
        self._pulls: dict[str, asyncio.Task[str]] = {}

    async def ensure(self, image: str, policy: PullPolicy, capsule: str) -> None:
        """Makes ``image`` present as ``policy`` says; raises CapsuleFailed or RetryLater."""
        try:
            if policy is not PullPolicy.ALWAYS and await self._cri.image_status(image):
                return
        except CriError as exc:
            raise classify(exc, f"checking image {image!r}") from exc
        if policy is PullPolicy.NEVER:
            raise CapsuleFailed(
                f"image {image!r} is not present on this host and its imagePullPolicy is Never"
            )
        await self._pull(image, capsule)

    async def _pull(self, image: str, capsule: str) -> None:
        task = self._pulls.get(image)
        if task is None:
            task = asyncio.create_task(self._cri.pull_image(image), name=f"pull {image}")
            self._pulls[image] = task
            task.add_done_callback(functools.partial(self._forget, image))
            log.info("pulling image", image=image, capsule=capsule)
        try:
            # A capsule deleted while waiting must not cancel a pull that others share.
            ref = await asyncio.shield(task)
        except CriError as exc:
            raise classify(exc, f"pulling image {image!r}") from exc
        log.info("image pulled", image=image, ref=ref, capsule=capsule)

    def _forget(self, image: str, task: asyncio.Task[str]) -> None:
        self._pulls.pop(image, None)
        # Every waiter may have been cancelled (capsules deleted): the failure is theirs, not news.
        if not task.cancelled():
            task.exception()
