from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import pytest

from capsa.model.capsule import Capsule, CapsuleKind, DesiredState, Status, TaskState
from capsa.model.clock import utcnow
from capsa.network.ipam import lowest_free_address, random_mac
from capsa.network.service import NetworkService
from capsa.store import Store, notify
from capsa.store.capsules import Action, AmbiguousName, CapsuleState, NameConflict
from capsa.store.paging import MarkerNotFound, Page

CapsuleFactory = Callable[..., Capsule]


async def test_create_then_find_by_uuid_and_name_within_project(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    capsule = make_capsule(name="web", init_containers=1, containers=2)
    await store.capsules.create(capsule)

    by_uuid = await store.capsules.find(capsule.uuid, "p1")
    by_name = await store.capsules.find("web", "p1")
    assert by_uuid is not None and by_name is not None
    assert by_uuid.uuid == by_name.uuid == capsule.uuid
    assert [c.spec.name for c in by_uuid.init_containers] == ["init0"]
    assert [c.spec.name for c in by_uuid.containers] == ["app0", "app1"]
    assert by_uuid.spec == capsule.spec
    assert by_uuid.status is Status.CREATING
    assert by_uuid.task_state is TaskState.SCHEDULING
    assert await store.capsules.find("web", "p2") is None
    assert await store.capsules.find("web", None) is not None


async def test_same_name_conflicts_within_a_project_only(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.capsules.create(make_capsule(name="web"))
    with pytest.raises(NameConflict):
        await store.capsules.create(make_capsule(name="web"))
    await store.capsules.create(make_capsule(name="web", project_id="p2"))
    assert await store.capsules.count(None) == 2


async def test_create_wakes_the_scheduler(store: Store, make_capsule: CapsuleFactory) -> None:
    sub = store.hub.subscribe(notify.SCHEDULER)
    await store.capsules.create(make_capsule())
    assert await sub.wait(0.1)
    assert not await sub.wait(0.01)


async def test_the_writes_that_change_a_capsule_s_status_or_remove_it_name_it(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    """For a client waiting for a status: each such write names the capsule (CAPSULE_STATUS),
    and the capsule's other writes do not."""
    await store.hosts.register("h1", "http://h1", 1000, 1000, ("runc",))
    placed, unplaced, unplaceable = make_capsule(), make_capsule(), make_capsule()
    for capsule in (placed, unplaced, unplaceable):
        await store.capsules.create(capsule)
    assert await store.hosts.claim(placed.uuid, "h1", 100, 64)
    statuses = store.hub.subscribe(notify.CAPSULE_STATUS)

    assert await store.capsules.update_status(placed.uuid, task_state=TaskState.CONTAINER_CREATING)
    await store.capsules.update_container(placed.containers[0].uuid, cri_container_id="c1")
    await store.capsules.rename(placed.uuid, "renamed")
    assert statuses.take_subjects() == set()

    assert await store.capsules.update_status(placed.uuid, status=Status.RUNNING)
    assert statuses.take_subjects() == {placed.uuid}
    stop = Action(frozenset({Status.RUNNING}), TaskState.CONTAINER_STOPPING, status=Status.STOPPED)
    await store.capsules.request_action(placed.uuid, stop)
    assert statuses.take_subjects() == {placed.uuid}
    assert await store.hosts.fail_placement(unplaceable.uuid, "no room")
    assert statuses.take_subjects() == {unplaceable.uuid}
    # Deleting (an agent tears it down), gone (nothing to tear down), removed by its agent.
    await store.capsules.request_delete(placed.uuid)
    await store.capsules.request_delete(unplaced.uuid)
    assert statuses.take_subjects() == {placed.uuid, unplaced.uuid}
    assert await store.capsules.remove(placed.uuid)
    assert statuses.take_subjects() == {placed.uuid}
    # A status write that finds no capsule to change names nothing.
    assert not await store.capsules.update_status(placed.uuid, status=Status.ERROR)
    assert statuses.take_subjects() == set()


@pytest.mark.parametrize("sort_dir", ["asc", "desc"])
async def test_pages_with_a_marker_cover_every_capsule_once(
    store: Store, make_capsule: CapsuleFactory, sort_dir: str
) -> None:
    names = [f"n{i:02d}" for i in range(7)]
    for name in names:
        await store.capsules.create(make_capsule(name=name))
    await store.capsules.create(make_capsule(name="other", project_id="p2"))

    seen: list[str] = []
    marker = None
    while True:
        page = await store.capsules.list_page(
            "p1", Page(limit=3, marker=marker, sort_key="name", sort_dir=sort_dir)
        )
        seen += [c.name for c in page]
        if len(page) < 3:
            break
        marker = page[-1].uuid
    assert seen == sorted(names, reverse=sort_dir == "desc")


async def test_an_unknown_marker_is_refused(store: Store) -> None:
    with pytest.raises(MarkerNotFound):
        await store.capsules.list_page("p1", Page(limit=3, marker="nope"))


async def test_delete_of_an_unplaced_capsule_is_immediate(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    capsule = make_capsule()
    await store.capsules.create(capsule)
    await store.capsules.request_delete(capsule.uuid)
    assert await store.capsules.get(capsule.uuid) is None


async def test_delete_of_a_placed_capsule_asks_its_agent_and_wins_over_status_writes(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 1000, ("runc",))
    capsule = make_capsule()
    await store.capsules.create(capsule)
    assert await store.hosts.claim(capsule.uuid, "h1", 100, 64)
    agent = store.hub.subscribe(notify.host_topic("h1"))

    await store.capsules.request_delete(capsule.uuid)

    assert await agent.wait(0.1)
    stored = await store.capsules.get(capsule.uuid)
    assert stored is not None
    assert stored.desired_state is DesiredState.DELETED
    assert stored.status is Status.DELETING
    # An agent that still believes the capsule should run cannot undo the delete.
    assert not await store.capsules.update_status(capsule.uuid, status=Status.RUNNING)
    stored = await store.capsules.get(capsule.uuid)
    assert stored is not None and stored.status is Status.DELETING


async def test_a_delete_by_name_or_uuid_marks_the_capsule_it_finds_in_the_project_only(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 1000, ("runc",))
    ours = make_capsule(name="web")
    await store.capsules.create(ours)
    theirs = make_capsule(name="web", project_id="p2")
    await store.capsules.create(theirs)
    for capsule in (ours, theirs):
        assert await store.hosts.claim(capsule.uuid, "h1", 100, 64)
    agent = store.hub.subscribe(notify.host_topic("h1"))

    assert await store.capsules.find_and_request_delete(theirs.uuid, "p1") is None
    assert await store.capsules.find_and_request_delete("web", "p1") == (ours.uuid, "p1")

    assert agent.take_subjects() == {ours.uuid}
    marked, untouched = await store.capsules.get(ours.uuid), await store.capsules.get(theirs.uuid)
    assert marked is not None and marked.desired_state is DesiredState.DELETED
    assert untouched is not None and untouched.desired_state is DesiredState.RUNNING
    # Every project's: the name is ambiguous, and nothing is marked.
    with pytest.raises(AmbiguousName):
        await store.capsules.find_and_request_delete("web", None)
    untouched = await store.capsules.get(theirs.uuid)
    assert untouched is not None and untouched.status is Status.CREATING
    assert await store.capsules.find_and_request_delete(theirs.uuid, None) == (theirs.uuid, "p2")


async def test_a_capsule_deleted_before_its_claim_is_not_placed(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 1000, ("runc",))
    capsule = make_capsule()
    await store.capsules.create(capsule)

    assert await store.capsules.find_and_request_delete(capsule.uuid, "p1") == (capsule.uuid, "p1")

    assert not await store.hosts.claim(capsule.uuid, "h1", 100, 64)
    assert await store.capsules.get(capsule.uuid) is None
    host = await store.hosts.get("h1")
    assert host is not None and host.cpu_millis_used == 0


async def test_a_status_write_carries_container_fields_in_its_transaction(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    capsule = make_capsule(containers=2)
    await store.capsules.create(capsule)
    first, second = capsule.containers

    assert await store.capsules.update_status(
        capsule.uuid,
        task_state=TaskState.CONTAINER_STARTING,
        containers={first.uuid: {"status": Status.CREATED, "cri_container_id": "cri-1"}},
    )

    stored = await store.capsules.get(capsule.uuid)
    assert stored is not None and stored.task_state is TaskState.CONTAINER_STARTING
    assert (stored.containers[0].status, stored.containers[0].cri_container_id) == (
        Status.CREATED,
        "cri-1",
    )
    assert stored.containers[1].status is second.status
    # Container fields alone: written, and the capsule's version (the lists' reuse) shows them.
    [(_, version)] = await store.capsules.list_page_versions("p1", Page(limit=1))
    assert await store.capsules.update_status(
        capsule.uuid, containers={second.uuid: {"exit_code": 3}}
    )
    [(_, changed)] = await store.capsules.list_page_versions("p1", Page(limit=1))
    assert changed != version
    stored = await store.capsules.get(capsule.uuid)
    assert stored is not None and stored.containers[1].exit_code == 3


async def test_remove_releases_the_claim_and_the_ports_in_one_go(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 1000, ("runc",))
    capsule = make_capsule(cpu_millis=300, memory_mb=200)
    await store.capsules.create(capsule)
    assert await store.hosts.claim(capsule.uuid, "h1", 300, 200)
    [port] = await NetworkService(store, "10.0.0.0/29", 1500).allocate_ports(
        capsule.uuid, "p1", "h1"
    )

    assert await store.capsules.remove(capsule.uuid)
    assert not await store.capsules.remove(capsule.uuid)

    host = await store.hosts.get("h1")
    assert host is not None
    assert (host.cpu_millis_used, host.memory_mb_used) == (0, 0)
    assert await store.ports.list_for_device(capsule.uuid) == []
    assert await store.capsules.get(capsule.uuid) is None
    assert await store.ports.list_for_subnet(port.subnet_id) == []


async def test_a_port_that_only_names_a_capsule_is_not_one_of_its_ports(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    capsule = make_capsule()
    await store.capsules.create(capsule)
    service = NetworkService(store, "10.0.0.0/28", 1500)
    [own] = await service.allocate_ports(capsule.uuid, "p1", "h1")
    # Any tenant may write any device_id on a port it makes through the API.
    named = await store.ports.create(
        network_id=own.network_id,
        project_id="p2",
        device_id=capsule.uuid,
        device_owner="",
        host=None,
        pick_address=lowest_free_address,
        mac_address=random_mac,
    )

    stored = await store.capsules.get(capsule.uuid)
    assert stored is not None and [a.port_id for a in stored.addresses] == [own.id]
    assert await store.ports.list_for_device(capsule.uuid) == [own]
    assert [p.id for p in await asyncio.to_thread(store.ports.to_bind, capsule.uuid)] == [own.id]

    assert await store.capsules.remove(capsule.uuid)
    assert await store.ports.get(named.id) == named


async def test_concurrent_status_writes_all_land(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    capsules = [make_capsule() for _ in range(10)]
    for capsule in capsules:
        await store.capsules.create(capsule)
    results = await asyncio.gather(
        *(store.capsules.update_status(c.uuid, status=Status.RUNNING) for c in capsules)
    )
    assert all(results)
    for c in capsules:
        stored = await store.capsules.get(c.uuid)
        assert stored is not None and stored.status is Status.RUNNING


async def test_a_container_is_found_with_its_capsule_within_its_project_only(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    capsule = make_capsule(init_containers=1, containers=2)
    await store.capsules.create(capsule)
    await store.capsules.create(make_capsule(containers=2))
    wanted = capsule.containers[1]

    found = await store.capsules.find_container(wanted.uuid, "p1")
    assert found is not None
    owner, container = found
    assert owner.uuid == capsule.uuid
    assert container.uuid == wanted.uuid and container.spec.name == "app1"
    assert await store.capsules.find_container(wanted.uuid, None) is not None
    assert await store.capsules.find_container(wanted.uuid, "p2") is None
    assert await store.capsules.find_container("no-such-container", None) is None


async def test_a_capsules_version_changes_with_its_row_its_containers_and_its_ports(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    capsule = make_capsule()
    await store.capsules.create(capsule)
    other = make_capsule()
    await store.capsules.create(other)
    network = NetworkService(store, "10.0.0.0/29", 1500)

    async def versions() -> dict[str, str]:
        return dict(await store.capsules.list_page_versions("p1", Page(limit=10)))

    seen = [await versions()]
    assert list(seen[0]) == [capsule.uuid, other.uuid]
    assert await versions() == seen[0], "nothing changed, nor may the versions"

    changes = [
        store.capsules.update_status(capsule.uuid, status=Status.RUNNING),
        store.capsules.update_container(capsule.containers[0].uuid, exit_code=3),
        network.allocate_ports(capsule.uuid, "p1", "h1"),
        network.release_ports(capsule.uuid),
    ]
    for change in changes:
        await change
        now = await versions()
        assert now[capsule.uuid] != seen[-1][capsule.uuid]
        assert now[other.uuid] == seen[0][other.uuid]
        seen.append(now)
    # Without its port the capsule shows again what it showed before it had one.
    assert seen[-1][capsule.uuid] == seen[2][capsule.uuid]

    loaded = await store.capsules.get_many([capsule.uuid, "no-such-capsule"])
    assert list(loaded) == [capsule.uuid]
    assert loaded[capsule.uuid].containers[0].exit_code == 3


async def test_exists_tells_capsules_and_single_containers_from_nothing(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    capsule = make_capsule(name="web")
    one = make_capsule(name="one")
    single = dataclasses.replace(
        one, spec=dataclasses.replace(one.spec, kind=CapsuleKind.CONTAINER)
    )
    await store.capsules.create(capsule)
    await store.capsules.create(single)

    assert await store.capsules.exists(capsule.uuid)
    assert await store.capsules.exists(single.uuid)
    assert not await store.capsules.exists("web")
    assert await store.capsules.remove(capsule.uuid)
    assert not await store.capsules.exists(capsule.uuid)


async def test_a_capsules_version_and_status_alone_are_found_as_find_finds_the_capsule(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    capsule = make_capsule(name="web")
    await store.capsules.create(capsule)
    await store.capsules.create(make_capsule(name="web", project_id="p2"))
    [(_, listed)] = await store.capsules.list_page_versions("p1", Page(limit=10))
    state = CapsuleState(listed, Status.CREATING)

    assert await store.capsules.find_state(capsule.uuid, "p1") == (capsule.uuid, state)
    assert await store.capsules.find_state("web", "p1") == (capsule.uuid, state)
    assert await store.capsules.find_state(capsule.uuid, None) == (capsule.uuid, state)
    assert await store.capsules.find_state(capsule.uuid, "p2") is None
    assert await store.capsules.find_state(capsule.uuid, "p1", CapsuleKind.CONTAINER) is None
    assert await store.capsules.find_state("nothing", "p1") is None
    with pytest.raises(AmbiguousName):
        await store.capsules.find_state("web", None)
    assert await store.capsules.states_of([capsule.uuid, "nothing"]) == {capsule.uuid: state}

    await store.capsules.update_container(capsule.containers[0].uuid, exit_code=1)
    found = await store.capsules.find_state("web", "p1")
    assert found is not None and found[1].version != listed
    assert await store.capsules.update_status(capsule.uuid, status=Status.RUNNING)
    [now] = (await store.capsules.states_of([capsule.uuid])).values()
    assert now.status is Status.RUNNING and now.version != found[1].version


async def test_create_names_its_capsule_and_remove_shows_the_freed_room_as_a_host_change(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 1024, ("runc",))
    sub = store.hub.subscribe(notify.SCHEDULER)
    capsule = make_capsule()
    await store.capsules.create(capsule)
    assert sub.take_subjects() == {capsule.uuid}
    assert await store.hosts.claim(capsule.uuid, "h1", 100, 64)
    before_remove = utcnow()

    assert await store.capsules.remove(capsule.uuid)

    [changed] = await store.hosts.changed_since(before_remove)
    assert changed.name == "h1" and changed.cpu_millis_used == 0
