from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from tests.unit.compute.conftest import CUT_SHORT_KEEPING_THE_TASK

from capsa.compute.driver import CapsuleDriver, Superseded
from capsa.compute.errors import stranded_task
from capsa.compute.images import ImagePuller
from capsa.cri import types as cri
from capsa.cri.client import CriError
from capsa.model.capsule import Capsule, CapsuleSpec, RestartPolicy, Status, TaskState
from capsa.network.service import NetworkService
from capsa.store import Store

CapsuleFactory = Callable[..., Capsule]

# The fake runtime makes containers whose command is one of these exit at once with the code.
EXITS = {"true": 0, "false": 1}


async def placed(
    store: Store,
    make_capsule: CapsuleFactory,
    init: tuple[str, ...] = (),
    apps: tuple[str, ...] = ("sleep",),
    policy: RestartPolicy = RestartPolicy.ALWAYS,
    privileged: frozenset[str] = frozenset(),
    **kwargs: Any,
) -> Capsule:
    """A capsule stored and claimed on host h1, its containers running ``init`` then ``apps``,
    those named in ``privileged`` privileged."""
    capsule = make_capsule(init_containers=len(init), containers=len(apps), **kwargs)
    for container, command in zip(capsule.all_containers(), (*init, *apps), strict=True):
        container.spec = replace(
            container.spec, command=(command,), privileged=container.spec.name in privileged
        )
    capsule.spec = replace(
        capsule.spec,
        init_containers=tuple(c.spec for c in capsule.init_containers),
        containers=tuple(c.spec for c in capsule.containers),
        restart_policy=policy,
    )
    await store.hosts.register("h1", "http://h1", 100_000, 100_000, ("runc",))
    await store.capsules.create(capsule)
    assert await store.hosts.claim(
        capsule.uuid, "h1", capsule.spec.cpu_millis, capsule.spec.memory_mb
    )
    stored = await store.capsules.get(capsule.uuid)
    assert stored is not None
    return stored


async def reload(store: Store, capsule: Capsule) -> Capsule:
    stored = await store.capsules.get(capsule.uuid)
    assert stored is not None
    return stored


async def running_then_deleted(
    driver: CapsuleDriver, store: Store, make_capsule: CapsuleFactory, **kwargs: Any
) -> Capsule:
    """A capsule placed (see :func:`placed`), converged, then deleted by its tenant: what its
    agent loads before tearing it down."""
    capsule = await placed(store, make_capsule, **kwargs)
    await driver.converge(capsule)
    await store.capsules.request_delete(capsule.uuid)
    return await reload(store, capsule)


async def assert_nothing_left(store: Store, fake_cri: Any, capsule: Capsule) -> None:
    assert not fake_cri.sandboxes and not fake_cri.containers
    assert await store.capsules.get(capsule.uuid) is None


async def test_a_new_capsule_gets_its_port_sandbox_init_then_containers_and_runs(
    driver: CapsuleDriver, store: Store, fake_cri: Any, make_capsule: CapsuleFactory
) -> None:
    fake_cri.exits_at_start = EXITS
    capsule = await placed(store, make_capsule, init=("true", "true"), apps=("sleep", "sleep"))

    await driver.converge(capsule)

    capsule = await reload(store, capsule)
    assert (capsule.status, capsule.task_state, capsule.status_reason) == (
        Status.RUNNING,
        None,
        None,
    )
    assert len(capsule.addresses) == 1
    (sandbox,) = fake_cri.sandboxes.values()
    assert (sandbox.name, sandbox.namespace, sandbox.uid) == (capsule.uuid, "p1", capsule.uuid)
    assert sandbox.labels["io.capsa.capsule"] == capsule.uuid
    assert capsule.sandbox_id == sandbox.id
    # Init containers ran one after the other, to completion, before the containers started.
    creates = [c for c in fake_cri.containers.values()]
    assert [c.name for c in sorted(creates, key=lambda c: c.created_at)] == [
        "init0",
        "init1",
        "app0",
        "app1",
    ]
    init_done = max(c.finished_at for c in creates if c.name.startswith("init"))
    assert all(c.started_at > init_done for c in creates if c.name.startswith("app"))
    assert [c.status for c in capsule.init_containers] == [Status.STOPPED, Status.STOPPED]
    assert [c.status for c in capsule.containers] == [Status.RUNNING, Status.RUNNING]
    assert all(c.cri_container_id for c in capsule.all_containers())


async def test_a_privileged_container_runs_privileged_in_a_privileged_sandbox(
    driver: CapsuleDriver, store: Store, fake_cri: Any, make_capsule: CapsuleFactory
) -> None:
    capsule = await placed(
        store, make_capsule, apps=("sleep", "sleep"), privileged=frozenset({"app0"})
    )

    await driver.converge(capsule)

    (sandbox_id,) = fake_cri.sandboxes
    assert fake_cri.specs[sandbox_id].privileged
    privileged = {fake_cri.specs[c].name: fake_cri.specs[c].privileged for c in fake_cri.containers}
    assert privileged == {"app0": True, "app1": False}
    # Other capsules are not privileged at all.
    other = await placed(store, make_capsule)
    await driver.converge(other)
    (other_sandbox,) = set(fake_cri.sandboxes) - {sandbox_id}
    assert not fake_cri.specs[other_sandbox].privileged


async def test_converging_again_changes_nothing(
    driver: CapsuleDriver, store: Store, fake_cri: Any, make_capsule: CapsuleFactory
) -> None:
    fake_cri.exits_at_start = EXITS
    capsule = await placed(store, make_capsule, init=("true",), apps=("sleep",))
    await driver.converge(capsule)
    sandboxes, containers = dict(fake_cri.sandboxes), dict(fake_cri.containers)
    fake_cri.calls.clear()

    await driver.converge(await reload(store, capsule))

    assert fake_cri.sandboxes == sandboxes and fake_cri.containers == containers
    assert not {"RunPodSandbox", "CreateContainer", "StartContainer"} & set(fake_cri.calls)


async def test_what_a_crash_left_is_adopted_not_duplicated(
    driver: CapsuleDriver, store: Store, fake_cri: Any, make_capsule: CapsuleFactory
) -> None:
    fake_cri.exits_at_start = EXITS
    capsule = await placed(store, make_capsule, init=("true",), apps=("sleep", "sleep"))
    await driver.converge(capsule)
    # As if the agent died after creating the second container and before starting it.
    second = capsule.containers[1]
    (old,) = fake_cri.by_name(second.spec.name)
    fake_cri.containers[old.id] = replace(old, state=cri.ContainerState.CREATED, started_at=0)
    sandbox_ids = set(fake_cri.sandboxes)

    await driver.converge(await reload(store, capsule))

    assert set(fake_cri.sandboxes) == sandbox_ids
    assert len(fake_cri.by_name("init0")) == 1, "a finished init container ran again"
    (adopted,) = fake_cri.by_name(second.spec.name)
    assert adopted.id == old.id and adopted.state is cri.ContainerState.RUNNING


async def test_a_sandbox_that_is_not_ready_is_replaced_and_init_runs_again(
    driver: CapsuleDriver, store: Store, fake_cri: Any, make_capsule: CapsuleFactory
) -> None:
    fake_cri.exits_at_start = EXITS
    capsule = await placed(store, make_capsule, init=("true",), apps=("sleep",))
    await driver.converge(capsule)
    (old,) = fake_cri.sandboxes.values()
    await fake_cri.stop_pod_sandbox(old.id)

    await driver.converge(await reload(store, capsule))

    (new,) = fake_cri.sandboxes.values()
    assert new.id != old.id and new.attempt == old.attempt + 1
    assert new.state is cri.SandboxState.READY
    assert [c.state for c in fake_cri.by_name("app0")] == [cri.ContainerState.RUNNING]
    assert (await reload(store, capsule)).sandbox_id == new.id


async def test_an_image_that_cannot_be_pulled_fails_the_capsule_and_leaves_no_sandbox(
    driver: CapsuleDriver, store: Store, fake_cri: Any, make_capsule: CapsuleFactory
) -> None:
    capsule = await placed(store, make_capsule)
    image = "registry.example/nope:1"
    fake_cri.missing_images.add(image)
    for container in capsule.containers:
        container.spec = replace(container.spec, image=image)

    await driver.converge(capsule)

    capsule = await reload(store, capsule)
    assert capsule.status is Status.ERROR and capsule.task_state is None
    assert capsule.status_reason is not None and image in capsule.status_reason
    assert fake_cri.sandboxes == {}


async def test_a_full_network_fails_the_capsule_with_the_reason_and_nothing_made(
    driver: CapsuleDriver, store: Store, fake_cri: Any, make_capsule: CapsuleFactory
) -> None:
    network = await store.networks.create_network(project_id="p1", name="tiny", mtu=1500)
    await store.networks.create_subnet(
        network_id=network.id,
        project_id="p1",
        cidr=ipaddress.IPv4Network("10.77.0.0/30"),
        gateway_ip=ipaddress.IPv4Address("10.77.0.1"),
    )
    first = await placed(store, make_capsule)
    second = await placed(store, make_capsule)
    for capsule in (first, second):
        capsule.spec = replace(capsule.spec, annotations={"capsa.io/network": "tiny"})

    await driver.converge(first)
    await driver.converge(second)

    assert (await reload(store, first)).status is Status.RUNNING
    failed = await reload(store, second)
    assert failed.status is Status.ERROR
    assert failed.status_reason is not None and "No more IP addresses" in failed.status_reason
    assert await store.ports.list_for_device(second.uuid) == []
    assert [s.name for s in fake_cri.sandboxes.values()] == [first.uuid]


async def test_a_project_without_room_for_its_default_network_fails_its_capsule(
    driver: CapsuleDriver, store: Store, fake_cri: Any, make_capsule: CapsuleFactory
) -> None:
    # The pool (10.9.0.0/24, see the network fixture) holds one project's default network.
    first = await placed(store, make_capsule, project_id="p1")
    second = await placed(store, make_capsule, project_id="p2")

    await driver.converge(first)
    await driver.converge(second)

    assert (await reload(store, first)).status is Status.RUNNING
    failed = await reload(store, second)
    assert failed.status is Status.ERROR
    assert failed.status_reason is not None and "network.default_cidr" in failed.status_reason


async def test_a_capsule_naming_a_network_it_may_not_use_fails(
    driver: CapsuleDriver, store: Store, fake_cri: Any, make_capsule: CapsuleFactory
) -> None:
    await store.networks.create_network(project_id="someone-else", name="theirs", mtu=1500)
    capsule = await placed(store, make_capsule)
    capsule.spec = replace(capsule.spec, annotations={"capsa.io/network": "theirs"})

    await driver.converge(capsule)

    failed = await reload(store, capsule)
    assert failed.status is Status.ERROR
    assert failed.status_reason is not None and "network theirs could not be found" in (
        failed.status_reason
    )
    assert fake_cri.sandboxes == {}


async def test_a_failing_init_container_with_restart_never_fails_the_capsule(
    driver: CapsuleDriver, store: Store, fake_cri: Any, make_capsule: CapsuleFactory
) -> None:
    fake_cri.exits_at_start = EXITS
    capsule = await placed(
        store, make_capsule, init=("false",), apps=("sleep",), policy=RestartPolicy.NEVER
    )

    await driver.converge(capsule)

    capsule = await reload(store, capsule)
    assert capsule.status is Status.ERROR
    assert capsule.status_reason == "init container 'init0' exited with code 1 (Error)"
    assert fake_cri.by_name("app0") == [], "containers started after a failed init container"


async def test_an_exited_container_is_restarted_as_a_new_attempt(
    driver: CapsuleDriver, store: Store, fake_cri: Any, make_capsule: CapsuleFactory
) -> None:
    capsule = await placed(store, make_capsule, policy=RestartPolicy.ON_FAILURE)
    await driver.converge(capsule)
    (first,) = fake_cri.by_name("app0")
    fake_cri.exit(first.id, 2)

    await driver.converge(await reload(store, capsule))

    (second,) = fake_cri.by_name("app0")
    assert second.attempt == 1 and second.state is cri.ContainerState.RUNNING
    capsule = await reload(store, capsule)
    (container,) = capsule.containers
    assert (container.restart_count, container.status) == (1, Status.RUNNING)
    assert capsule.status is Status.RUNNING


@pytest.fixture
def slow(settings: Any, store: Store, fake_cri: Any, network: Any, retries: Any) -> CapsuleDriver:
    """A driver whose restarts wait a 30 s back-off."""
    return CapsuleDriver(
        replace(settings, restart_backoff_base=30.0, restart_backoff_max=60.0),
        store,
        fake_cri,
        network,
        ImagePuller(fake_cri),
        retries,
        fake_cri.free_task,
    )


async def test_a_restart_waits_for_its_back_off(
    slow: CapsuleDriver,
    store: Store,
    fake_cri: Any,
    retries: Any,
    make_capsule: CapsuleFactory,
) -> None:
    capsule = await placed(store, make_capsule)
    await slow.converge(capsule)
    (first,) = fake_cri.by_name("app0")
    fake_cri.exit(first.id, 1)

    await slow.converge(await reload(store, capsule))

    assert fake_cri.by_name("app0")[0].id == first.id, "restarted before the back-off"
    ((uuid, delay),) = retries.asked
    assert uuid == capsule.uuid and 25 < delay <= 30
    (container,) = (await reload(store, capsule)).containers
    assert container.status is Status.RESTARTING
    assert container.status_reason == "back-off 30s after exit code 1"


async def test_a_pass_that_ends_waiting_for_an_init_back_off_writes_what_it_saw(
    slow: CapsuleDriver,
    store: Store,
    fake_cri: Any,
    retries: Any,
    make_capsule: CapsuleFactory,
) -> None:
    # The pass ends inside the init container's back-off, without a status of the capsule to
    # write: the container's records of the pass are written all the same.
    fake_cri.exits_at_start = EXITS
    capsule = await placed(store, make_capsule, init=("false",), apps=("sleep",))

    await slow.converge(capsule)

    [(uuid, _)] = retries.asked
    assert uuid == capsule.uuid
    (init,) = (await reload(store, capsule)).init_containers
    assert (init.status, init.exit_code) == (Status.RESTARTING, 1)
    assert init.status_reason == "back-off 30s after exit code 1"
    assert init.cri_container_id == fake_cri.by_name("init0")[0].id


@pytest.mark.parametrize(
    ("code", "status", "reason"),
    [(0, Status.STOPPED, None), (3, Status.ERROR, "container 'app0' exited with code 3")],
)
async def test_a_capsule_whose_containers_finished_for_good_is_stopped_or_failed(
    driver: CapsuleDriver,
    store: Store,
    fake_cri: Any,
    make_capsule: CapsuleFactory,
    code: int,
    status: Status,
    reason: str | None,
) -> None:
    capsule = await placed(store, make_capsule, policy=RestartPolicy.NEVER)
    await driver.converge(capsule)
    (container,) = fake_cri.by_name("app0")
    fake_cri.exit(container.id, code)

    await driver.converge(await reload(store, capsule))

    capsule = await reload(store, capsule)
    assert (capsule.status, capsule.status_reason) == (status, reason)
    assert len(fake_cri.by_name("app0")) == 1


async def retried_not_blamed(store: Store, capsule: Capsule, retries: Any) -> None:
    """The capsule still waits to start, says it is retrying, and a retry is asked for."""
    capsule = await reload(store, capsule)
    assert capsule.status is Status.CREATING
    assert capsule.status_reason is not None and capsule.status_reason.startswith("retrying:")
    assert retries.asked and retries.asked[0][0] == capsule.uuid


async def test_a_runtime_that_is_down_is_retried_not_blamed_on_the_capsule(
    driver: CapsuleDriver,
    store: Store,
    fake_cri: Any,
    retries: Any,
    make_capsule: CapsuleFactory,
) -> None:
    capsule = await placed(store, make_capsule)
    fake_cri.unavailable = True

    await driver.converge(capsule)

    await retried_not_blamed(store, capsule, retries)


async def test_a_start_that_a_crashed_agent_left_under_way_is_retried_not_blamed(
    driver: CapsuleDriver,
    store: Store,
    fake_cri: Any,
    retries: Any,
    make_capsule: CapsuleFactory,
) -> None:
    capsule = await placed(store, make_capsule)
    start_container = fake_cri.start_container

    async def already_starting(container_id: str) -> None:
        # containerd still runs the StartContainer of an agent killed mid-call: it refuses a
        # second one, then finishes the first.
        await start_container(container_id)
        raise CriError(
            "StartContainer",
            "UNKNOWN",
            f'failed to set starting state for container "{container_id}": '
            "container is already in starting state",
        )

    fake_cri.start_container = already_starting
    await driver.converge(capsule)

    await retried_not_blamed(store, capsule, retries)

    fake_cri.start_container = start_container
    await driver.converge(capsule)
    assert (await reload(store, capsule)).status is Status.RUNNING


# What runc says of a container that containerd 1.6 made with the sandbox's namespaces taken
# from pid 0 (a CreateContainer cut short, or a sandbox whose task had gone).
PID_0 = "namespace path: lstat /proc/0/ns/ipc: no such file or directory"


async def test_a_container_whose_creation_was_cut_short_is_made_again_not_started(
    driver: CapsuleDriver, store: Store, fake_cri: Any, make_capsule: CapsuleFactory
) -> None:
    fake_cri.exits_at_start = EXITS
    capsule = await placed(store, make_capsule, init=("true",), apps=("sleep",))
    # As if the agent died during CreateContainer of the init container, which containerd
    # finished, wrong: no start gets past it, and the records name no container.
    sandbox_spec = driver._sandbox_spec(capsule, 0)
    sandbox_id = await fake_cri.run_pod_sandbox(sandbox_spec)
    (init,) = capsule.init_containers
    cut_short = await fake_cri.create_container(
        sandbox_id, driver._container_spec(capsule, init, 0), sandbox_spec
    )
    fake_cri.unstartable[cut_short] = PID_0

    await driver.converge(capsule)

    capsule = await reload(store, capsule)
    assert (capsule.status, capsule.status_reason) == (Status.RUNNING, None)
    (made_again,) = fake_cri.by_name("init0")
    assert made_again.id != cut_short and made_again.attempt == 0
    assert made_again.state is cri.ContainerState.EXITED and made_again.exit_code == 0
    assert capsule.init_containers[0].cri_container_id == made_again.id
    assert list(fake_cri.sandboxes) == [sandbox_id]


async def test_a_created_container_the_records_name_is_started_not_made_again(
    driver: CapsuleDriver, store: Store, fake_cri: Any, make_capsule: CapsuleFactory
) -> None:
    capsule = await placed(store, make_capsule, apps=("sleep",))
    await driver.converge(capsule)
    # As if the agent died once CreateContainer returned and its record was written.
    (app,) = fake_cri.by_name("app0")
    fake_cri.containers[app.id] = replace(app, state=cri.ContainerState.CREATED, started_at=0)
    fake_cri.calls.clear()

    await driver.converge(await reload(store, capsule))

    (started,) = fake_cri.by_name("app0")
    assert started.id == app.id and started.state is cri.ContainerState.RUNNING
    assert "RemoveContainer" not in fake_cri.calls


async def test_a_start_that_fails_because_the_sandbox_lost_its_task_gets_a_new_sandbox(
    driver: CapsuleDriver,
    store: Store,
    fake_cri: Any,
    retries: Any,
    make_capsule: CapsuleFactory,
) -> None:
    fake_cri.exits_at_start = EXITS
    capsule = await placed(store, make_capsule, init=("true",), apps=("sleep",))
    start_container = fake_cri.start_container

    async def pause_gone(container_id: str) -> None:
        # The sandbox's task exited while the container was made: containerd took its
        # namespaces from pid 0, and marks the sandbox not ready.
        (sandbox_id,) = fake_cri.sandboxes
        fake_cri.sandboxes[sandbox_id] = replace(
            fake_cri.sandboxes[sandbox_id], state=cri.SandboxState.NOT_READY
        )
        fake_cri.unstartable[container_id] = PID_0
        await start_container(container_id)

    fake_cri.start_container = pause_gone
    await driver.converge(capsule)

    await retried_not_blamed(store, capsule, retries)
    (lost,) = fake_cri.sandboxes.values()

    fake_cri.start_container = start_container
    await driver.converge(await reload(store, capsule))

    capsule = await reload(store, capsule)
    assert (capsule.status, capsule.status_reason) == (Status.RUNNING, None)
    (new,) = fake_cri.sandboxes.values()
    assert new.id != lost.id and new.attempt == lost.attempt + 1
    assert capsule.sandbox_id == new.id
    assert [c.state for c in fake_cri.by_name("init0")] == [cri.ContainerState.EXITED]
    assert [c.state for c in fake_cri.by_name("app0")] == [cri.ContainerState.RUNNING]


async def test_a_create_in_a_sandbox_that_is_gone_is_retried_in_a_new_one(
    driver: CapsuleDriver,
    store: Store,
    fake_cri: Any,
    retries: Any,
    make_capsule: CapsuleFactory,
) -> None:
    capsule = await placed(store, make_capsule, apps=("sleep",))
    create_container = fake_cri.create_container

    async def sandbox_removed(
        sandbox_id: str, spec: cri.ContainerSpec, sandbox: cri.SandboxSpec
    ) -> str:
        await fake_cri.remove_pod_sandbox(sandbox_id)
        raise CriError(
            "CreateContainer",
            "UNKNOWN",
            f"creating container 'app0' failed: failed to get sandbox container task: "
            f"no running task found: task {sandbox_id}: unknown",
        )

    fake_cri.create_container = sandbox_removed
    await driver.converge(capsule)

    await retried_not_blamed(store, capsule, retries)

    fake_cri.create_container = create_container
    await driver.converge(await reload(store, capsule))

    assert (await reload(store, capsule)).status is Status.RUNNING
    assert [c.state for c in fake_cri.by_name("app0")] == [cri.ContainerState.RUNNING]


async def test_a_container_that_cannot_start_in_a_ready_sandbox_fails_the_capsule(
    driver: CapsuleDriver, store: Store, fake_cri: Any, make_capsule: CapsuleFactory
) -> None:
    why = 'exec: "nope": executable file not found in $PATH'
    fake_cri.fails_at_start = {"nope": why}
    capsule = await placed(store, make_capsule, apps=("nope",))

    await driver.converge(capsule)

    capsule = await reload(store, capsule)
    assert capsule.status is Status.ERROR and capsule.task_state is None
    reason = capsule.status_reason or ""
    assert reason.startswith("starting container 'app0'") and why in reason
    assert [s.state for s in fake_cri.sandboxes.values()] == [cri.SandboxState.READY]


async def test_a_capsule_deleted_while_it_starts_is_not_marked_running(
    driver: CapsuleDriver, store: Store, make_capsule: CapsuleFactory
) -> None:
    capsule = await placed(store, make_capsule)
    await store.capsules.request_delete(capsule.uuid)

    with pytest.raises(Superseded):
        await driver.converge(capsule)

    capsule = await reload(store, capsule)
    assert capsule.status is Status.DELETING
    assert capsule.task_state is TaskState.CONTAINER_DELETING


async def test_teardown_removes_the_runtime_state_then_the_records_port_and_claim(
    driver: CapsuleDriver, store: Store, fake_cri: Any, make_capsule: CapsuleFactory
) -> None:
    fake_cri.exits_at_start = EXITS
    capsule = await placed(store, make_capsule, init=("true",), apps=("sleep", "sleep"))
    await driver.converge(capsule)
    await store.capsules.request_delete(capsule.uuid)

    assert await driver.teardown(await reload(store, capsule))

    assert fake_cri.sandboxes == {} and fake_cri.containers == {}
    assert fake_cri.calls.count("StopContainer") == 2, "running containers get their grace period"
    assert await store.capsules.get(capsule.uuid) is None
    assert await store.ports.list_for_device(capsule.uuid) == []
    host = await store.hosts.get("h1")
    assert host is not None and host.cpu_millis_used == 0


async def test_teardown_with_the_runtime_down_keeps_the_records_and_retries(
    driver: CapsuleDriver,
    store: Store,
    fake_cri: Any,
    retries: Any,
    make_capsule: CapsuleFactory,
) -> None:
    capsule = await placed(store, make_capsule)
    await driver.converge(capsule)
    await store.capsules.request_delete(capsule.uuid)
    fake_cri.unavailable = True

    assert not await driver.teardown(await reload(store, capsule))

    kept = await reload(store, capsule)
    assert kept.status is Status.DELETING
    assert kept.status_reason is not None and "cannot reach" in kept.status_reason
    assert retries.asked[-1][0] == capsule.uuid


@pytest.mark.parametrize(
    ("name", "hostname"),
    [("Web_Server 1", "web-server-1"), ("-x-", "x"), ("***", "capsule"), ("a" * 80, "a" * 63)],
)
def test_hostnames_are_dns_labels(name: str, hostname: str) -> None:
    spec = CapsuleSpec(name=name, containers=())
    assert spec.sandbox_hostname == hostname
    assert replace(spec, hostname="chosen").sandbox_hostname == "chosen"


async def test_sandbox_starts_are_bounded_but_the_rest_of_a_start_is_not(
    driver: CapsuleDriver,
    store: Store,
    fake_cri: Any,
    network: NetworkService,
    make_capsule: CapsuleFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The fixture's driver allows 2 sandbox calls at once.
    capsules = [await placed(store, make_capsule) for _ in range(5)]
    run_pod_sandbox = fake_cri.run_pod_sandbox
    in_flight, most = 0, 0
    release = asyncio.Event()

    async def held_run_pod_sandbox(spec: cri.SandboxSpec) -> str:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await release.wait()
        in_flight -= 1
        return str(await run_pod_sandbox(spec))

    # The rest of a start (ports, images) is not bounded: every capsule's ports are allocated
    # while two sandbox calls are held and the other three wait for a slot.
    allocate_ports = network.allocate_ports
    allocated: set[str] = set()
    all_allocated = asyncio.Event()

    async def watched_allocate_ports(device_id: str, *args: Any) -> Any:
        ports = await allocate_ports(device_id, *args)
        allocated.add(device_id)
        if len(allocated) == len(capsules):
            all_allocated.set()
        return ports

    fake_cri.run_pod_sandbox = held_run_pod_sandbox
    monkeypatch.setattr(network, "allocate_ports", watched_allocate_ports)
    starts = asyncio.gather(*(driver.converge(c) for c in capsules))
    # The timeout only keeps a bound on whole capsules from hanging the test.
    await asyncio.wait_for(all_allocated.wait(), 30)
    assert in_flight == 2
    release.set()
    await starts

    assert most == 2
    assert [(await reload(store, c)).status for c in capsules] == [Status.RUNNING] * 5


async def test_a_new_capsules_sandbox_ports_and_images_are_asked_for_at_once(
    driver: CapsuleDriver,
    store: Store,
    fake_cri: Any,
    network: NetworkService,
    make_capsule: CapsuleFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    capsule = await placed(store, make_capsule)
    # Each of the three steps waits until the other two have begun: done one after the other,
    # the first would wait for ever (the timeout breaks the barrier and fails the start). The
    # sandbox need not wait for the ports: the CNI daemon's ADD waits for them.
    all_begun = asyncio.Barrier(3)

    def waiting_first(step: Callable[..., Any]) -> Callable[..., Any]:
        async def step_after_the_others_begun(*args: Any, **kwargs: Any) -> Any:
            async with asyncio.timeout(10):
                await all_begun.wait()
            return await step(*args, **kwargs)

        return step_after_the_others_begun

    monkeypatch.setattr(network, "allocate_ports", waiting_first(network.allocate_ports))
    fake_cri.run_pod_sandbox = waiting_first(fake_cri.run_pod_sandbox)
    fake_cri.image_status = waiting_first(fake_cri.image_status)

    await driver.converge(capsule)

    assert (await reload(store, capsule)).status is Status.RUNNING
    # A capsule that never had a sandbox has none to list.
    assert "ListPodSandbox" not in fake_cri.calls


@pytest.fixture
def writes(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The values of every capsule status write, in order."""
    update_status = store.capsules.update_status
    written: list[dict[str, Any]] = []

    async def recorded_update_status(uuid: str, **values: Any) -> bool:
        written.append(values)
        return bool(await update_status(uuid, **values))

    monkeypatch.setattr(store.capsules, "update_status", recorded_update_status)
    return written


async def test_image_pulling_is_said_while_an_image_is_pulled_only(
    driver: CapsuleDriver,
    store: Store,
    fake_cri: Any,
    make_capsule: CapsuleFactory,
    writes: list[dict[str, Any]],
) -> None:
    present = await placed(store, make_capsule)
    await driver.converge(present)
    assert not [w for w in writes if w.get("task_state") is TaskState.IMAGE_PULLING]

    writes.clear()
    fake_cri.images.discard("busybox")
    pulled = await placed(store, make_capsule)
    await driver.converge(pulled)
    assert fake_cri.pulls == ["busybox"]
    assert [w for w in writes if w.get("task_state") is TaskState.IMAGE_PULLING]
    assert (await reload(store, pulled)).status is Status.RUNNING


async def test_the_sandbox_id_goes_with_the_next_write_not_one_of_its_own(
    driver: CapsuleDriver,
    store: Store,
    make_capsule: CapsuleFactory,
    writes: list[dict[str, Any]],
) -> None:
    capsule = await placed(store, make_capsule)
    await driver.converge(capsule)

    (with_sandbox,) = [w for w in writes if "sandbox_id" in w]
    # The write that goes with CreateContainer, the first after the sandbox.
    assert with_sandbox["task_state"] is TaskState.CONTAINER_CREATING
    assert (await reload(store, capsule)).sandbox_id == with_sandbox["sandbox_id"]


async def test_a_runtime_call_is_sent_before_the_write_that_announces_it(
    driver: CapsuleDriver,
    store: Store,
    fake_cri: Any,
    make_capsule: CapsuleFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The writes that say what the runtime does run while it does it, not before: gRPC's aio
    # call sends its request from a task of its own, which the caller's first await only
    # schedules, and the write, on the event loop, must not run before that task does.
    events: list[str] = []
    update_status = store.capsules.update_status

    async def recorded_update_status(uuid: str, **values: Any) -> bool:
        if values.get("task_state") is not None:
            events.append(f"write {values['task_state'].value}")
        return bool(await update_status(uuid, **values))

    def sent_from_a_task(name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        async def send(*args: Any) -> Any:
            events.append(f"sent {name}")
            return await call(*args)

        async def invoked(*args: Any) -> Any:
            return await asyncio.ensure_future(send(*args))

        return invoked

    monkeypatch.setattr(store.capsules, "update_status", recorded_update_status)
    fake_cri.create_container = sent_from_a_task("CreateContainer", fake_cri.create_container)
    fake_cri.start_container = sent_from_a_task("StartContainer", fake_cri.start_container)
    capsule = await placed(store, make_capsule)

    await driver.converge(capsule)

    assert events == [
        "sent CreateContainer",
        f"write {TaskState.CONTAINER_CREATING.value}",
        "sent StartContainer",
        f"write {TaskState.CONTAINER_STARTING.value}",
    ]


async def test_a_capsule_deleted_while_its_sandbox_starts_is_superseded_then_torn_down(
    driver: CapsuleDriver,
    store: Store,
    fake_cri: Any,
    make_capsule: CapsuleFactory,
) -> None:
    capsule = await placed(store, make_capsule)
    run_pod_sandbox = fake_cri.run_pod_sandbox

    async def run_while_deleted(spec: cri.SandboxSpec) -> str:
        await store.capsules.request_delete(capsule.uuid)
        return str(await run_pod_sandbox(spec))

    fake_cri.run_pod_sandbox = run_while_deleted

    with pytest.raises(Superseded):
        await driver.converge(capsule)
    # The write beside CreateContainer was refused: the pass ended before starting anything.
    assert "StartContainer" not in fake_cri.calls

    assert await driver.teardown(await reload(store, capsule))
    assert not fake_cri.sandboxes and not fake_cri.containers
    assert await store.capsules.get(capsule.uuid) is None


async def test_a_first_sandbox_that_a_cut_short_pass_made_is_adopted_not_duplicated(
    driver: CapsuleDriver, store: Store, fake_cri: Any, make_capsule: CapsuleFactory
) -> None:
    capsule = await placed(store, make_capsule)
    # As if the agent died once RunPodSandbox returned, before the sandbox id was written.
    first = await fake_cri.run_pod_sandbox(driver._sandbox_spec(capsule, 0))

    await driver.converge(capsule)

    capsule = await reload(store, capsule)
    assert list(fake_cri.sandboxes) == [first] and capsule.sandbox_id == first
    assert capsule.status is Status.RUNNING


async def test_ports_that_cannot_be_allocated_end_the_sandbox_call_that_waits_for_them(
    driver: CapsuleDriver,
    store: Store,
    fake_cri: Any,
    make_capsule: CapsuleFactory,
) -> None:
    await store.networks.create_network(project_id="someone-else", name="theirs", mtu=1500)
    capsule = await placed(store, make_capsule)
    capsule.spec = replace(capsule.spec, annotations={"capsa.io/network": "theirs"})
    cancelled = asyncio.Event()

    async def waiting_for_ports(spec: cri.SandboxSpec) -> str:
        # containerd's CNI ADD waits for ports that will never come.
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    fake_cri.run_pod_sandbox = waiting_for_ports

    async with asyncio.timeout(10):
        await driver.converge(capsule)

    assert cancelled.is_set()
    failed = await reload(store, capsule)
    assert failed.status is Status.ERROR and failed.status_reason is not None
    assert "network theirs could not be found" in failed.status_reason
    assert fake_cri.sandboxes == {}


async def test_teardown_stops_containers_gracefully_then_removes_the_sandbox_in_one_call(
    driver: CapsuleDriver, store: Store, fake_cri: Any, make_capsule: CapsuleFactory
) -> None:
    capsule = await running_then_deleted(driver, store, make_capsule)
    fake_cri.calls.clear()

    assert await driver.teardown(capsule)

    # RemovePodSandbox stops the sandbox itself: a StopPodSandbox before it would make the
    # runtime tear the pod's network down twice (two CNI DELs).
    assert [c for c in fake_cri.calls if not c.startswith("List")] == [
        "StopContainer",
        "RemovePodSandbox",
    ]
    await assert_nothing_left(store, fake_cri, capsule)


async def test_teardown_stops_the_recorded_containers_without_waiting_for_the_listing(
    driver: CapsuleDriver, store: Store, fake_cri: Any, make_capsule: CapsuleFactory
) -> None:
    capsule = await running_then_deleted(driver, store, make_capsule, apps=("sleep", "sleep"))
    recorded = {c.cri_container_id for c in capsule.containers}
    # The listings answer only once both recorded containers were asked to stop: a teardown
    # that stopped them after the listing would wait for ever (the timeout fails it).
    both_stopping = asyncio.Event()
    stopping: set[str] = set()
    stop_container = fake_cri.stop_container

    async def telling_stop(container_id: str, timeout_s: int) -> None:
        stopping.add(container_id)
        if recorded <= stopping:
            both_stopping.set()
        await stop_container(container_id, timeout_s)

    def answering_once_stopping(listing: Callable[..., Any]) -> Callable[..., Any]:
        async def listed(*args: Any, **kwargs: Any) -> Any:
            async with asyncio.timeout(10):
                await both_stopping.wait()
            return await listing(*args, **kwargs)

        return listed

    fake_cri.stop_container = telling_stop
    fake_cri.list_containers = answering_once_stopping(fake_cri.list_containers)
    fake_cri.list_pod_sandboxes = answering_once_stopping(fake_cri.list_pod_sandboxes)

    assert await driver.teardown(capsule)

    assert stopping == recorded
    await assert_nothing_left(store, fake_cri, capsule)


async def test_teardown_stops_and_removes_what_the_records_miss(
    driver: CapsuleDriver, store: Store, fake_cri: Any, make_capsule: CapsuleFactory
) -> None:
    capsule = await running_then_deleted(driver, store, make_capsule, apps=("sleep", "sleep"))
    # As after a crash between StartContainer and its record: the second container runs, and
    # its record says it was never made. And a sandbox of an earlier attempt is left over.
    unrecorded = capsule.containers[1]
    await store.capsules.update_container(
        unrecorded.uuid, cri_container_id=None, status=Status.CREATING
    )
    fake_cri.add_sandbox(
        {"io.capsa.capsule": capsule.uuid, "io.capsa.managed": "true"}, cri.SandboxState.NOT_READY
    )

    assert await driver.teardown(await reload(store, capsule))

    assert sorted(fake_cri.stopped) == sorted(c.cri_container_id for c in capsule.containers)
    assert fake_cri.stop_timeouts == [1, 1], "each got its grace period"
    await assert_nothing_left(store, fake_cri, capsule)


# ---- starts cut short by the agent's crash, and the tasks containerd keeps behind them ----


async def killed_while_starting(
    driver: CapsuleDriver,
    fake_cri: Any,
    capsule: Capsule,
    name: str,
    message: str = CUT_SHORT_KEEPING_THE_TASK,
) -> str:
    """Converges the capsule as an agent killed during StartContainer of container ``name``
    would: containerd sees the call cancelled (by default once its shim made the task, which
    it keeps). Returns the container's id."""
    start_container = fake_cri.start_container
    cut: list[str] = []

    async def killed_mid_call(container_id: str) -> None:
        if fake_cri.containers[container_id].name != name:
            await start_container(container_id)
            return
        fake_cri.cut_short(container_id, message)
        cut.append(container_id)
        raise asyncio.CancelledError

    fake_cri.start_container = killed_mid_call
    with pytest.raises(asyncio.CancelledError):
        await driver.converge(capsule)
    fake_cri.start_container = start_container
    (container_id,) = cut
    return container_id


async def init_start_cut_short(
    driver: CapsuleDriver,
    store: Store,
    fake_cri: Any,
    make_capsule: CapsuleFactory,
    policy: RestartPolicy = RestartPolicy.ALWAYS,
    message: str = CUT_SHORT_KEEPING_THE_TASK,
) -> tuple[Capsule, str]:
    """A capsule of an init container and an app whose agent was killed during the init
    container's StartContainer (see :func:`killed_while_starting`); the capsule and the id of
    the container whose start was cut short."""
    fake_cri.exits_at_start = EXITS
    capsule = await placed(store, make_capsule, init=("true",), apps=("sleep",), policy=policy)
    return capsule, await killed_while_starting(driver, fake_cri, capsule, "init0", message)


async def converge_until_retries_stop(
    driver: CapsuleDriver, store: Store, capsule: Capsule, retries: Any
) -> Capsule:
    """Converges again as long as the driver asks for a retry (at most a few times)."""
    for _ in range(4):
        asked = len(retries.asked)
        await driver.converge(await reload(store, capsule))
        if len(retries.asked) == asked:
            break
    return await reload(store, capsule)


async def test_an_init_container_whose_start_was_cut_short_runs_again_and_is_no_restart(
    driver: CapsuleDriver,
    store: Store,
    fake_cri: Any,
    retries: Any,
    make_capsule: CapsuleFactory,
) -> None:
    capsule, cut_short = await init_start_cut_short(
        driver, store, fake_cri, make_capsule, RestartPolicy.NEVER
    )

    # The next agent finds it exited (128, StartError), its removal refused until the task
    # containerd kept is freed: that pass is retried, not failed.
    await driver.converge(await reload(store, capsule))
    retrying = await reload(store, capsule)
    assert retrying.status is Status.CREATING
    assert retrying.status_reason is not None and cut_short in retrying.status_reason
    assert fake_cri.freed == [cut_short]
    assert retries.asked[-1][0] == capsule.uuid

    capsule = await converge_until_retries_stop(driver, store, capsule, retries)

    assert (capsule.status, capsule.status_reason) == (Status.RUNNING, None)
    (init,) = capsule.init_containers
    assert (init.restart_count, init.exit_code, init.status) == (0, 0, Status.STOPPED)
    (again,) = fake_cri.by_name("init0")
    assert again.id != cut_short and again.attempt == 1 and again.exit_code == 0
    assert [c.state for c in fake_cri.by_name("app0")] == [cri.ContainerState.RUNNING]


@pytest.mark.parametrize(
    "message",
    [
        # Seen on containerd 1.6.20 when the agent was killed at other moments of the call.
        "failed to create containerd task: failed to start shim: start failed: : signal: killed: "
        "unknown",
        "failed to create containerd task: failed to create shim task: context canceled: unknown",
        'failed to start containerd task "c9": context canceled: unknown',
    ],
)
async def test_an_init_container_whose_start_was_cut_short_earlier_runs_again_at_once(
    driver: CapsuleDriver,
    store: Store,
    fake_cri: Any,
    retries: Any,
    make_capsule: CapsuleFactory,
    message: str,
) -> None:
    capsule, _ = await init_start_cut_short(
        driver, store, fake_cri, make_capsule, RestartPolicy.NEVER, message
    )

    await driver.converge(await reload(store, capsule))

    capsule = await reload(store, capsule)
    assert (capsule.status, capsule.status_reason) == (Status.RUNNING, None)
    assert capsule.init_containers[0].restart_count == 0
    assert [c.attempt for c in fake_cri.by_name("init0")] == [1]
    assert fake_cri.freed == [] and retries.asked == []


async def test_a_container_whose_restart_was_cut_short_is_started_again_not_counted(
    driver: CapsuleDriver,
    store: Store,
    fake_cri: Any,
    retries: Any,
    make_capsule: CapsuleFactory,
) -> None:
    capsule = await placed(store, make_capsule, apps=("sleep",), policy=RestartPolicy.ON_FAILURE)
    await driver.converge(capsule)
    (first,) = fake_cri.by_name("app0")
    fake_cri.exit(first.id, 2)
    cut_short = await killed_while_starting(driver, fake_cri, await reload(store, capsule), "app0")

    capsule = await converge_until_retries_stop(driver, store, capsule, retries)

    assert (capsule.status, capsule.status_reason) == (Status.RUNNING, None)
    (app,) = capsule.containers
    assert app.restart_count == 1, "the exit counts, the start the crash cut short does not"
    assert fake_cri.freed == [cut_short]
    (running,) = fake_cri.by_name("app0")
    assert running.attempt == 2 and running.state is cri.ContainerState.RUNNING


async def test_a_start_that_failed_on_its_own_still_counts(
    driver: CapsuleDriver, store: Store, fake_cri: Any, make_capsule: CapsuleFactory
) -> None:
    # Exited 128 (StartError) too, but the runtime's reason is not a cancelled call.
    fake_cri.exits_at_start = EXITS
    capsule = await placed(
        store, make_capsule, init=("true",), apps=("sleep",), policy=RestartPolicy.NEVER
    )
    sandbox_spec = driver._sandbox_spec(capsule, 0)
    sandbox_id = await fake_cri.run_pod_sandbox(sandbox_spec)
    (init,) = capsule.init_containers
    failed = await fake_cri.create_container(
        sandbox_id, driver._container_spec(capsule, init, 0), sandbox_spec
    )
    fake_cri.exit(failed, 128, "StartError")
    fake_cri.containers[failed] = replace(
        fake_cri.containers[failed],
        message="failed to create containerd task: context deadline exceeded: unknown",
    )

    await driver.converge(capsule)

    capsule = await reload(store, capsule)
    assert capsule.status is Status.ERROR
    assert capsule.status_reason is not None and "exited with code 128" in capsule.status_reason
    assert fake_cri.freed == []


async def test_a_stale_sandbox_holding_a_stranded_task_is_freed_and_replaced(
    driver: CapsuleDriver,
    store: Store,
    fake_cri: Any,
    retries: Any,
    make_capsule: CapsuleFactory,
) -> None:
    capsule, cut_short = await init_start_cut_short(driver, store, fake_cri, make_capsule)
    # Its sandbox lost its task meanwhile: the next pass replaces it, and must remove it.
    (old,) = fake_cri.sandboxes
    fake_cri.sandboxes[old] = replace(fake_cri.sandboxes[old], state=cri.SandboxState.NOT_READY)

    capsule = await converge_until_retries_stop(driver, store, capsule, retries)

    assert (capsule.status, capsule.status_reason) == (Status.RUNNING, None)
    assert fake_cri.freed == [cut_short]
    assert old not in fake_cri.sandboxes and capsule.sandbox_id in fake_cri.sandboxes


async def test_teardown_frees_a_stranded_task_then_removes_everything(
    driver: CapsuleDriver,
    store: Store,
    fake_cri: Any,
    retries: Any,
    make_capsule: CapsuleFactory,
) -> None:
    capsule, cut_short = await init_start_cut_short(driver, store, fake_cri, make_capsule)
    await store.capsules.request_delete(capsule.uuid)

    assert not await driver.teardown(await reload(store, capsule))
    deleting = await reload(store, capsule)
    assert deleting.status_reason is not None and cut_short in deleting.status_reason
    assert fake_cri.freed == [cut_short] and retries.asked[-1][0] == capsule.uuid

    assert await driver.teardown(await reload(store, capsule))
    await assert_nothing_left(store, fake_cri, capsule)


async def test_an_orphan_sandbox_holding_a_stranded_task_goes_at_the_next_try(
    driver: CapsuleDriver, fake_cri: Any
) -> None:
    orphan = fake_cri.add_sandbox({"io.capsa.capsule": "gone"}, cri.SandboxState.READY)
    container_id = await fake_cri.create_container(
        orphan, cri.ContainerSpec(name="x", image="busybox"), cri.SandboxSpec("gone", "p", "u")
    )
    fake_cri.cut_short(container_id)

    await driver.remove_orphan(fake_cri.sandboxes[orphan])
    assert fake_cri.freed == [container_id] and orphan in fake_cri.sandboxes

    await driver.remove_orphan(fake_cri.sandboxes[orphan])
    assert orphan not in fake_cri.sandboxes


@pytest.mark.parametrize(
    "message",
    [
        'failed to delete containerd container "c1": cannot delete running task c1: '
        "failed precondition",
        'failed to remove container "c1": failed to delete containerd container "c1": '
        "cannot delete running task c1: failed precondition",
    ],
)
def test_the_container_whose_task_blocks_a_removal_is_named(message: str) -> None:
    assert stranded_task(CriError("RemovePodSandbox", "UNKNOWN", message)) == "c1"
    assert stranded_task(CriError("RemovePodSandbox", "UNKNOWN", "sandbox not found")) is None
