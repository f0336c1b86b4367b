from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from capsa.compute.errors import CapsuleFailed, RetryLater
from capsa.compute.images import ImagePuller, RegistryCredentials
from capsa.cri.client import CriError
from capsa.cri.types import ImageAuth
from capsa.model.capsule import PullPolicy
from capsa.model.registry import Registry
from capsa.secrets import SecretBox
from capsa.store import Store


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


async def test_a_private_registry_pulls_with_its_current_credentials_to_its_host_only(
    fake_cri: Any, store: Store, tmp_path: Path
) -> None:
    secrets = SecretBox.load_or_create(tmp_path / "credentials.key")
    registry = await store.registries.create(
        Registry(
            uuid="r1",
            project_id="p1",
            user_id="u1",
            domain="registry.example.com:5000",
            name="private",
            username="alice",
            password_token=secrets.encrypt("s3cret"),
        )
    )
    auths: list[object] = []
    pull = fake_cri.pull_image

    async def recording_pull(image: str, auth: object = None) -> str:
        auths.append(auth)
        return str(await pull(image))

    fake_cri.pull_image = recording_pull
    puller = ImagePuller(fake_cri, RegistryCredentials(store, secrets))
    image = "registry.example.com:5000/app:1"
    await puller.ensure(image, PullPolicy.ALWAYS, "c1", registry.uuid)
    await puller.ensure(image, PullPolicy.ALWAYS, "c2")
    assert auths == [
        ImageAuth(
            username="alice",
            password="s3cret",
            server_address="https://registry.example.com:5000",
        ),
        None,
    ]


async def test_refused_credentials_and_missing_ones_say_so(
    fake_cri: Any, store: Store, tmp_path: Path
) -> None:
    secrets = SecretBox.load_or_create(tmp_path / "credentials.key")
    await store.registries.create(
        Registry(
            uuid="r1",
            project_id="p1",
            user_id="u1",
            domain="registry.example.com",
            name="private",
            username="alice",
            password_token=secrets.encrypt("wrong"),
        )
    )

    async def refusing_pull(image: str, auth: object = None) -> str:
        raise CriError("PullImage", "UNKNOWN", f"pulling {image}: 401 Unauthorized")

    fake_cri.pull_image = refusing_pull
    puller = ImagePuller(fake_cri, RegistryCredentials(store, secrets))
    with pytest.raises(
        CapsuleFailed,
        match=r"registry registry.example.com refused the credentials of private registry "
        r"'private' \(r1\) \(user 'alice'\): .*401 Unauthorized",
    ):
        await puller.ensure("registry.example.com/app", PullPolicy.ALWAYS, "c1", "r1")
    with pytest.raises(CapsuleFailed, match=r"requires credentials.*/v1/registries"):
        await puller.ensure("registry.example.com/app", PullPolicy.ALWAYS, "c1")
    with pytest.raises(CapsuleFailed, match=r"private registry gone was deleted"):
        await puller.ensure("registry.example.com/app", PullPolicy.ALWAYS, "c1", "gone")
