from __future__ import annotations

import asyncio
from typing import Any

import pytest

from capsa.compute.errors import CapsuleFailed, RetryLater
from capsa.compute.images import ImagePuller
from capsa.model.capsule import PullPolicy


async def test_if_not_present_pulls_only_what_is_missing(fake_cri: Any) -> None:
    puller = ImagePuller(fake_cri)
    await puller.ensure("busybox", PullPolicy.IF_NOT_PRESENT, "c1")
    await puller.ensure("nginx", PullPolicy.IF_NOT_PRESENT, "c1")
    assert fake_cri.pulls == ["nginx"]


async def test_always_pulls_even_what_is_present(fake_cri: Any) -> None:
    await ImagePuller(fake_cri).ensure("busybox", PullPolicy.ALWAYS, "c1")
    assert fake_cri.pulls == ["busybox"]


async def test_never_uses_what_is_present_and_refuses_what_is_not(fake_cri: Any) -> None:
    puller = ImagePuller(fake_cri)
    await puller.ensure("busybox", PullPolicy.NEVER, "c1")
    with pytest.raises(CapsuleFailed, match=r"'nginx' is not present .* imagePullPolicy is Never"):
        await puller.ensure("nginx", PullPolicy.NEVER, "c1")
    assert fake_cri.pulls == []


async def test_capsules_waiting_for_one_image_share_one_pull(fake_cri: Any) -> None:
    pull = fake_cri.pull_image
    started = asyncio.Event()

    async def slow_pull(image: str, auth: object = None) -> str:
        started.set()
        await asyncio.sleep(0.05)
        return str(await pull(image))

    fake_cri.pull_image = slow_pull
    puller = ImagePuller(fake_cri)
    await asyncio.gather(*(puller.ensure("nginx", PullPolicy.ALWAYS, f"c{i}") for i in range(5)))
    assert fake_cri.pulls == ["nginx"]
    # Once done, a later capsule with Always pulls again.
    await puller.ensure("nginx", PullPolicy.ALWAYS, "c9")
    assert fake_cri.pulls == ["nginx", "nginx"]


async def test_a_missing_image_fails_naming_it_and_a_down_runtime_is_retried(
    fake_cri: Any,
) -> None:
    fake_cri.missing_images.add("ghost:1")
    with pytest.raises(CapsuleFailed, match="pulling image 'ghost:1'"):
        await ImagePuller(fake_cri).ensure("ghost:1", PullPolicy.IF_NOT_PRESENT, "c1")
    fake_cri.unavailable = True
    with pytest.raises(RetryLater):
        await ImagePuller(fake_cri).ensure("other", PullPolicy.IF_NOT_PRESENT, "c1")
