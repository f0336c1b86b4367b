"""The driver on single containers (capsules of kind container): created without running, started,
stopped, rebooted, killed, removed once exited (auto_remove), restarted at most MaximumRetryCount
times, each as desired state that the API wrote through the store's actions."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import pytest
from tests.unit.compute.conftest import FakeCri

from capsa.compute import labels
from capsa.compute.agent import _needs_work
from capsa.compute.driver import CapsuleDriver, settled
from capsa.cri import types as cri
from capsa.model.capsule import (
    Capsule,
    CapsuleKind,
    DesiredState,
    RestartPolicy,
    Status,
    TaskState,
)
from capsa.store import Store
from capsa.store.capsules import Action

CapsuleFactory = Callable[..., Capsule]

START = Action(
    allowed=frozenset({Status.CREATED, Status.STOPPED, Status.ERROR}),
    task_state=TaskState.CONTAINER_STARTING,
    desired_state=DesiredState.RUNNING,
    new_generation=True,
)


async def single(
    store: Store,
    make_capsule: CapsuleFactory,
    command: str = "sleep",
    desired: DesiredState = DesiredState.RUNNING,
    **spec: object,
) -> Capsule:
    """A single container stored and placed on h1, its container's uuid its own."""
    capsule = make_capsule()
    (container,) = capsule.containers
    container.uuid = capsule.uuid
    container.spec = replace(container.spec, command=(command,))
    capsule.spec = replace(
        capsule.spec,
        containers=(container.spec,),
        kind=CapsuleKind.CONTAINER,
        **{"restart_policy": RestartPolicy.NEVER, **spec},  # type: ignore[arg-type]
    )
    capsule.desired_state = desired
    await store.hosts.register("h1", "http://h1", 100_000, 100_000, ("runc",))
    await store.capsules.create(capsule)
    assert await store.hosts.claim(capsule.uuid, "h1", 100, 64)
    return await reload(store, capsule)


async def reload(store: Store, capsule: Capsule) -> Capsule:
    stored = await store.capsules.get(capsule.uuid)
    assert stored is not None
    return stored


def states(fake_cri: FakeCri) -> list[cri.ContainerState]:
    return [c.state for c in fake_cri.by_name("app0")]


async def test_a_container_created_without_run_is_created_then_started_on_request(
    driver: CapsuleDriver, store: Store, fake_cri: FakeCri, make_capsule: CapsuleFactory
) -> None:
    capsule = await single(store, make_capsule, desired=DesiredState.STOPPED)

    await driver.converge(capsule)

    created = await reload(store, capsule)
    assert (created.status, created.task_state) == (Status.CREATED, None)
    assert states(fake_cri) == [cri.ContainerState.CREATED]
    assert created.addresses and settled(created)

    await store.capsules.request_action(capsule.uuid, START)
    await driver.converge(await reload(store, capsule))

    running = await reload(store, capsule)
    assert (running.status, running.task_state, running.generation) == (Status.RUNNING, None, 1)
    # The container created earlier never ran: it is the one started.
    assert states(fake_cri) == [cri.ContainerState.RUNNING]


async def test_stop_keeps_the_sandbox_and_start_runs_a_new_attempt(
    driver: CapsuleDriver, store: Store, fake_cri: FakeCri, make_capsule: CapsuleFactory
) -> None:
    capsule = await single(store, make_capsule)
    await driver.converge(capsule)
    sandbox = (await reload(store, capsule)).sandbox_id

    await store.capsules.request_action(
        capsule.uuid,
        Action(
            allowed=frozenset({Status.RUNNING}),
            task_state=TaskState.CONTAINER_STOPPING,
            desired_state=DesiredState.STOPPED,
            stop_timeout=3,
        ),
    )
    await driver.converge(await reload(store, capsule))

    stopped = await reload(store, capsule)
    assert (stopped.status, stopped.task_state) == (Status.STOPPED, None)
    assert fake_cri.stop_timeouts == [3]
    assert stopped.sandbox_id == sandbox and stopped.addresses
    # Stopped as asked: no restart policy, no resync brings it back.
    fake_cri.calls.clear()
    await driver.converge(stopped)
    assert fake_cri.calls == []

    await store.capsules.request_action(capsule.uuid, START)
    await driver.converge(await reload(store, capsule))

    again = await reload(store, capsule)
    assert again.status is Status.RUNNING and again.sandbox_id == sandbox
    [attempt] = fake_cri.by_name("app0")
    assert (attempt.attempt, attempt.state) == (1, cri.ContainerState.RUNNING)
    assert attempt.labels[labels.GENERATION] == "1"


async def test_reboot_replaces_a_running_container_within_its_timeout(
    driver: CapsuleDriver, store: Store, fake_cri: FakeCri, make_capsule: CapsuleFactory
) -> None:
    capsule = await single(store, make_capsule)
    await driver.converge(capsule)

    await store.capsules.request_action(
        capsule.uuid,
        Action(
            allowed=frozenset({Status.RUNNING}),
            task_state=TaskState.CONTAINER_REBOOTING,
            desired_state=DesiredState.RUNNING,
            new_generation=True,
            status=Status.RESTARTING,
            stop_timeout=0,
        ),
    )
    rebooting = await reload(store, capsule)
    assert (rebooting.status, rebooting.generation) == (Status.RESTARTING, 1)
    await driver.converge(rebooting)

    rebooted = await reload(store, capsule)
    assert (rebooted.status, rebooted.task_state) == (Status.RUNNING, None)
    assert fake_cri.stop_timeouts == [0]
    [attempt] = fake_cri.by_name("app0")
    assert (attempt.attempt, attempt.state) == (1, cri.ContainerState.RUNNING)
    # A reboot is not a restart of the restart policy.
    assert rebooted.containers[0].restart_count == 0


@pytest.fixture
async def process() -> AsyncIterator[asyncio.subprocess.Process]:
    """A real process standing for a container's, to receive the signal."""
    child = await asyncio.create_subprocess_exec("sleep", "60")
    yield child
    if child.returncode is None:
        child.kill()
    await child.wait()


async def test_kill_sends_the_signal_to_the_containers_process_once(
    driver: CapsuleDriver,
    store: Store,
    fake_cri: FakeCri,
    make_capsule: CapsuleFactory,
    process: asyncio.subprocess.Process,
) -> None:
    capsule = await single(store, make_capsule)
    await driver.converge(capsule)
    [container] = fake_cri.by_name("app0")
    fake_cri.pids[container.id] = process.pid

    await store.capsules.request_action(
        capsule.uuid,
        Action(
            allowed=frozenset({Status.RUNNING}),
            task_state=TaskState.CONTAINER_KILLING,
            pending_signal="SIGTERM",
        ),
    )
    await driver.converge(await reload(store, capsule))

    assert await process.wait() == -signal.SIGTERM
    killed = await reload(store, capsule)
    assert (killed.pending_signal, killed.task_state) == (None, None)


async def test_auto_remove_deletes_a_container_that_exited(
    driver: CapsuleDriver, store: Store, fake_cri: FakeCri, make_capsule: CapsuleFactory
) -> None:
    fake_cri.exits_at_start = {"true": 0}
    capsule = await single(store, make_capsule, command="true", auto_remove=True)

    await driver.converge(capsule)
    running = await reload(store, capsule)
    assert running.desired_state is DesiredState.RUNNING
    # The container watcher's kick once it exited.
    await driver.converge(running)

    gone = await reload(store, capsule)
    assert (gone.desired_state, gone.status) == (DesiredState.DELETED, Status.DELETING)


async def test_on_failure_restarts_at_most_maximum_retry_count_times(
    driver: CapsuleDriver, store: Store, fake_cri: FakeCri, make_capsule: CapsuleFactory
) -> None:
    fake_cri.exits_at_start = {"false": 1}
    capsule = await single(
        store,
        make_capsule,
        command="false",
        restart_policy=RestartPolicy.ON_FAILURE,
        max_retries=2,
    )

    for _ in range(5):
        await driver.converge(await reload(store, capsule))

    assert [c.attempt for c in fake_cri.by_name("app0")] == [2]
    ended = await reload(store, capsule)
    assert ended.status is Status.STOPPED
    assert ended.containers[0].restart_count == 2


def test_the_resync_looks_again_at_pending_actions_and_older_generations(
    make_capsule: CapsuleFactory,
) -> None:
    capsule = make_capsule()
    capsule.status, capsule.task_state, capsule.generation = Status.RUNNING, None, 1
    (member,) = capsule.containers
    member.status = Status.RUNNING
    sandbox = cri.PodSandbox(
        "s1", capsule.uuid, "p1", capsule.uuid, 0, cri.SandboxState.READY, 1,
        {labels.CAPSULE: capsule.uuid}, {}, "runc",
    )  # fmt: skip

    def running(generation: str) -> list[cri.Container]:
        return [
            cri.Container(
                "c1", "s1", "app0", 0, "busybox", "busybox", cri.ContainerState.RUNNING, 1,
                {labels.CONTAINER: member.uuid, labels.GENERATION: generation}, {},
            )
        ]  # fmt: skip

    assert not _needs_work(capsule, [sandbox], running("1"))
    # A reboot whose wake-up was lost: the container runs for the generation before.
    assert _needs_work(capsule, [sandbox], running("0"))
    # Stopped as asked: nothing to do, until a signal or an action is pending.
    capsule.desired_state, capsule.status = DesiredState.STOPPED, Status.STOPPED
    assert not _needs_work(capsule, [sandbox], [])
    capsule.task_state = TaskState.CONTAINER_STARTING
    assert _needs_work(capsule, [sandbox], [])
