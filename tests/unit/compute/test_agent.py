from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from capsa.compute.agent import ComputeAgent
from capsa.config import AgentConfig, Config, ContainerdConfig
from capsa.cri import types as cri
from capsa.model.capsule import Capsule, Status
from capsa.network.service import NetworkService
from capsa.store import Store

CapsuleFactory = Callable[..., Capsule]


def agent_for(tmp_path: Path, store: Store, fake_cri: Any, network: NetworkService) -> ComputeAgent:
    cfg = Config(
        state_dir=tmp_path,
        host_name="h1",
        agent=AgentConfig(restart_backoff_base=0.0),
        # An operator's socket: the agent must not go looking for capsa's own containerd's shims.
        containerd=ContainerdConfig(socket=str(tmp_path / "theirs.sock")),
    )
    return ComputeAgent(cfg, store, fake_cri, network)


async def place(store: Store, capsule: Capsule) -> None:
    await store.hosts.register("h1", "http://h1", 100_000, 100_000, ("runc",))
    await store.capsules.create(capsule)
    assert await store.hosts.claim(capsule.uuid, "h1", 100, 64)


async def test_resync_starts_waiting_capsules_and_removes_sandboxes_of_no_capsule(
    tmp_path: Path,
    store: Store,
    fake_cri: Any,
    network: NetworkService,
    make_capsule: CapsuleFactory,
) -> None:
    agent = agent_for(tmp_path, store, fake_cri, network)
    capsule = make_capsule()
    await place(store, capsule)
    orphan = fake_cri.add_sandbox(
        {"io.capsa.managed": "true", "io.capsa.capsule": "gone"}, cri.SandboxState.READY
    )
    foreign = fake_cri.add_sandbox({"someone": "else"}, cri.SandboxState.READY)

    await agent.resync()
    await agent.idle()
    await asyncio.gather(*agent._background)

    stored = await store.capsules.get(capsule.uuid)
    assert stored is not None and stored.status is Status.RUNNING
    assert orphan not in fake_cri.sandboxes
    assert foreign in fake_cri.sandboxes, "a sandbox capsa did not make was touched"


async def test_a_running_capsule_whose_container_exited_is_looked_at_again(
    tmp_path: Path,
    store: Store,
    fake_cri: Any,
    network: NetworkService,
    make_capsule: CapsuleFactory,
) -> None:
    agent = agent_for(tmp_path, store, fake_cri, network)
    capsule = make_capsule()
    await place(store, capsule)
    await agent.resync()
    await agent.idle()
    (container,) = fake_cri.by_name("app0")
    fake_cri.exit(container.id, 1)

    await agent.resync()
    await agent.idle()

    restarted = fake_cri.by_name("app0")
    assert [c.attempt for c in restarted] == [1]
    assert restarted[0].state is cri.ContainerState.RUNNING


async def test_a_kick_during_work_runs_the_capsule_once_more(
    tmp_path: Path,
    store: Store,
    fake_cri: Any,
    network: NetworkService,
    make_capsule: CapsuleFactory,
) -> None:
    agent = agent_for(tmp_path, store, fake_cri, network)
    capsule = make_capsule()
    await place(store, capsule)
    passes = 0
    in_pass = asyncio.Event()
    converge = agent._driver.converge

    async def counting(c: Capsule) -> None:
        nonlocal passes
        passes += 1
        in_pass.set()
        await asyncio.sleep(0.05)
        await converge(c)

    agent._driver.converge = counting  # type: ignore[method-assign]
    agent.kick(capsule.uuid)
    # Kicks before the worker starts are covered by its pass, which reads the latest state.
    agent.kick(capsule.uuid)
    await asyncio.wait_for(in_pass.wait(), 5)
    agent.kick(capsule.uuid)
    agent.kick(capsule.uuid)
    await agent.idle()
    assert passes == 2, "kicks during a pass must fold into exactly one more pass"


@pytest.mark.parametrize("wakeup", ["about the capsule", "about nothing in particular"])
async def test_deleting_a_capsule_that_is_being_started_tears_it_down(
    tmp_path: Path,
    store: Store,
    fake_cri: Any,
    network: NetworkService,
    make_capsule: CapsuleFactory,
    wakeup: str,
) -> None:
    agent = agent_for(tmp_path, store, fake_cri, network)
    capsule = make_capsule()
    await place(store, capsule)
    pulling = asyncio.Event()
    pull = fake_cri.pull_image

    async def stuck_pull(image: str, auth: object = None) -> str:
        pulling.set()
        await asyncio.sleep(3600)
        return str(await pull(image))

    fake_cri.pull_image = stuck_pull
    fake_cri.images.clear()
    agent.kick(capsule.uuid)
    await asyncio.wait_for(pulling.wait(), 5)

    await store.capsules.request_delete(capsule.uuid)
    if wakeup == "about the capsule":
        await agent._kick_changed(capsule.uuid)
    else:
        await agent._kick_pending()
    await asyncio.wait_for(agent.idle(), 5)

    assert await store.capsules.get(capsule.uuid) is None
    assert fake_cri.sandboxes == {}
    await agent.stop()
