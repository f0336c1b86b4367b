"""A GET of one capsule or container: its ETag, If-None-Match and Prefer: wait (api.watch)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from tests.unit.api.api_helpers import ADMIN, Client, api_headers, create, zun_template

from capsa.api.params import preferred_statuses, preferred_wait
from capsa.api.watch import CapsuleWatch
from capsa.model.capsule import Capsule, Status, TaskState
from capsa.store import Store
from capsa.store.capsules import CapsuleState

MakeClient = Callable[..., Awaitable[Client]]
# Long enough that only a wake-up, not a recheck, can answer within a test.
NO_RECHECK = 600.0


async def etag_of(client: Client, path: str, headers: dict[str, str] = ADMIN) -> str:
    response = await client.get(path, headers=headers)
    assert response.status == 200, await response.text()
    etag: str = response.headers["ETag"]
    return etag


def waiting(etag: str, seconds: int, headers: dict[str, str] = ADMIN) -> dict[str, str]:
    return {**headers, "If-None-Match": etag, "Prefer": f"wait={seconds}"}


async def tagged(client: Client, name: str) -> tuple[str, str, str]:
    """A new capsule's uuid, path and ETag."""
    created = await create(client, zun_template(name=name))
    path = f"/v1/capsules/{created['uuid']}"
    return created["uuid"], path, await etag_of(client, path)


async def waited_on(client: Client, name: str) -> tuple[str, str, asyncio.Task[Any]]:
    """A new capsule, its ETag, and a GET of it that waits for a change, once the API holds it
    (a held request has not answered yet)."""
    created = await create(client, zun_template(name=name))
    path = f"/v1/capsules/{created['uuid']}"
    etag = await etag_of(client, path)
    request = asyncio.create_task(client.get(path, headers=waiting(etag, 60)))
    await asyncio.sleep(0.3)
    assert not request.done(), "the request did not wait for a change"
    return created["uuid"], etag, request


async def test_a_show_answers_304_while_its_etag_holds_and_200_once_anything_changed(
    client: Client, store: Store
) -> None:
    created = await create(client, zun_template(name="tagged"))
    path = f"/v1/capsules/{created['uuid']}"
    etag = await etag_of(client, path)
    assert etag == await etag_of(client, "/v1/capsules/tagged")

    unchanged = await client.get(path, headers={**ADMIN, "If-None-Match": etag})
    assert unchanged.status == 304
    assert unchanged.headers["ETag"] == etag
    assert await unchanged.read() == b""
    # Any of a list of tags, weak ones too, and "*".
    for sent in (f'"other", W/{etag}', "*"):
        response = await client.get(path, headers={**ADMIN, "If-None-Match": sent})
        assert response.status == 304, sent
    other = await client.get(path, headers={**ADMIN, "If-None-Match": '"other"'})
    assert other.status == 200

    assert await store.capsules.update_status(created["uuid"], status=Status.RUNNING)
    changed = await client.get(path, headers={**ADMIN, "If-None-Match": etag})
    assert changed.status == 200
    assert (await changed.json())["status"] == "Running"
    assert changed.headers["ETag"] != etag


@pytest.mark.parametrize(
    ("path", "query", "body"),
    [
        ("/v1/capsules", "", {"template": zun_template(name="fresh")}),
        ("/v1/containers", "?run=true", {"image": "busybox"}),
    ],
)
async def test_a_create_answers_with_its_show_s_etag_and_body(
    client: Client, store: Store, path: str, query: str, body: dict[str, Any]
) -> None:
    # A client can wait for the first change with what the create told it, without a GET.
    response = await client.post(path + query, json=body, headers=ADMIN)
    assert response.status == 202, await response.text()
    created = await response.json()
    url = response.headers["Location"]
    assert url.endswith(f"{path}/{created['uuid']}")
    assert response.headers["Content-Location"] == url
    etag = response.headers["ETag"]
    show = f"{path}/{created['uuid']}"
    shown = await client.get(show, headers=ADMIN)
    assert (shown.headers["ETag"], await shown.json()) == (etag, created)

    held = asyncio.create_task(client.get(show, headers=waiting(etag, 60)))
    await asyncio.sleep(0.3)
    assert not held.done(), "the create's ETag is not the show's"
    assert await store.capsules.update_status(created["uuid"], status=Status.RUNNING)
    async with asyncio.timeout(10):
        changed = await held
    assert changed.status == 200
    assert changed.headers["ETag"] != etag


async def test_the_etag_differs_with_what_the_request_makes_of_the_capsule(client: Client) -> None:
    created = await create(client, zun_template(name="shapes"), headers=api_headers(project="a"))
    path = f"/v1/capsules/{created['uuid']}"
    member = await etag_of(client, path, api_headers(project="a"))
    tags = {
        member,
        await etag_of(client, path, api_headers("1.31", project="a")),
        await etag_of(client, path, api_headers(project="a", roles="admin")),
    }
    assert len(tags) == 3
    legacy = {**api_headers("1.31", project="a"), "If-None-Match": member}
    assert (await client.get(path, headers=legacy)).status == 200


async def test_a_waiting_show_answers_as_soon_as_a_write_changes_the_capsule(
    make_client: MakeClient, store: Store
) -> None:
    client = await make_client(wait_recheck_interval=NO_RECHECK)
    uuid, etag, request = await waited_on(client, "awaited")
    assert await store.capsules.update_status(uuid, status=Status.RUNNING)
    async with asyncio.timeout(10):
        response = await request
    assert response.status == 200
    assert (await response.json())["status"] == "Running"
    assert response.headers["ETag"] != etag


async def test_a_waiting_show_answers_404_once_the_capsule_is_gone(
    make_client: MakeClient, store: Store
) -> None:
    client = await make_client(wait_recheck_interval=NO_RECHECK)
    uuid, _, request = await waited_on(client, "going")
    assert await store.capsules.remove(uuid)
    async with asyncio.timeout(10):
        response = await request
    assert response.status == 404
    assert (await response.json())["errors"][0]["code"] == "container.capsule-not-found"


async def test_a_wait_until_a_status_answers_only_at_a_change_into_it(
    make_client: MakeClient, store: Store
) -> None:
    client = await make_client(wait_recheck_interval=NO_RECHECK)
    uuid, path, etag = await tagged(client, "starting")
    prefer = {**waiting(etag, 60), "Prefer": "wait=60, until-status=Running|Error"}
    request = asyncio.create_task(client.get(path, headers=prefer))
    # Steps of the start change the capsule without bringing it to either status.
    for task_state in (TaskState.NETWORK_ATTACHING, TaskState.CONTAINER_CREATING):
        await asyncio.sleep(0.2)
        assert await store.capsules.update_status(uuid, task_state=task_state)
        await asyncio.sleep(0.2)
        assert not request.done(), f"answered at {task_state}"
    assert await store.capsules.update_status(uuid, status=Status.RUNNING, task_state=None)
    async with asyncio.timeout(10):
        response = await request
    assert response.status == 200
    assert (await response.json())["status"] == "Running"
    assert response.headers["ETag"] != etag


@pytest.mark.parametrize("sends_etag", [True, False])
async def test_a_wait_until_a_status_holds_a_client_that_saw_an_older_version_or_none(
    make_client: MakeClient, store: Store, sends_etag: bool
) -> None:
    client = await make_client(wait_recheck_interval=NO_RECHECK)
    response = await client.post(
        "/v1/capsules", json={"template": zun_template(name="behind")}, headers=ADMIN
    )
    assert response.status == 202, await response.text()
    created = await response.json()
    # The claim changes the capsule before the client's first look, as in every start.
    assert await store.capsules.update_status(
        created["uuid"], task_state=TaskState.NETWORK_ATTACHING
    )
    headers = {**ADMIN, "Prefer": "wait=60, until-status=Running|Error"}
    if sends_etag:
        headers["If-None-Match"] = response.headers["ETag"]
    request = asyncio.create_task(client.get(f"/v1/capsules/{created['uuid']}", headers=headers))
    await asyncio.sleep(0.3)
    assert not request.done(), "answered before the capsule had either status"
    assert await store.capsules.update_status(created["uuid"], status=Status.ERROR)
    async with asyncio.timeout(10):
        response = await request
    assert response.status == 200
    assert (await response.json())["status"] == "Error"


async def test_a_wait_until_a_status_answers_404_once_the_capsule_is_gone(
    make_client: MakeClient, store: Store
) -> None:
    client = await make_client(wait_recheck_interval=NO_RECHECK)
    uuid, path, etag = await tagged(client, "leaving")
    prefer = {**waiting(etag, 60), "Prefer": "wait=60, until-status=Error"}
    request = asyncio.create_task(client.get(path, headers=prefer))
    await asyncio.sleep(0.3)
    assert await store.capsules.remove(uuid)
    async with asyncio.timeout(10):
        response = await request
    assert response.status == 404


async def test_a_wait_until_a_status_that_ends_without_it_answers_what_changed_or_304(
    make_client: MakeClient, store: Store
) -> None:
    client = await make_client(max_wait=1.0, wait_recheck_interval=NO_RECHECK)
    uuid, path, etag = await tagged(client, "slow")
    prefer = {**waiting(etag, 30), "Prefer": "wait=30, until-status=running"}

    # Nothing changed: 304, and the preferences it honoured.
    async with asyncio.timeout(10):
        response = await client.get(path, headers=prefer)
    assert response.status == 304
    assert response.headers["Preference-Applied"] == "wait=1, until-status=Running"

    # A change into another status: not answered at once, but a 304 would hide it at the end.
    request = asyncio.create_task(client.get(path, headers=prefer))
    await asyncio.sleep(0.2)
    assert await store.capsules.update_status(uuid, status=Status.STOPPED)
    await asyncio.sleep(0.2)
    assert not request.done(), "answered at a status it was not waiting for"
    async with asyncio.timeout(10):
        response = await request
    assert response.status == 200
    assert (await response.json())["status"] == "Stopped"
    assert response.headers["ETag"] != etag


async def test_a_write_of_another_process_is_seen_at_the_next_recheck(
    make_client: MakeClient, store: Store, tmp_path: Path
) -> None:
    client = await make_client(wait_recheck_interval=0.2)
    # Another store on the same database file wakes nothing in this process.
    other = Store(f"sqlite:///{tmp_path / 'capsa.db'}")
    await other.open()
    try:
        uuid, _, request = await waited_on(client, "elsewhere")
        assert await other.capsules.update_status(uuid, status=Status.RUNNING)
        async with asyncio.timeout(10):
            response = await request
    finally:
        await other.close()
    assert response.status == 200
    assert (await response.json())["status"] == "Running"


async def test_a_wait_that_ends_unchanged_answers_304_and_says_it_waited(
    make_client: MakeClient,
) -> None:
    client = await make_client(max_wait=1.0)
    # A single container waits as a capsule does.
    response = await client.post("/v1/containers", json={"image": "busybox"}, headers=ADMIN)
    assert response.status == 202, await response.text()
    path = f"/v1/containers/{(await response.json())['uuid']}"
    etag = await etag_of(client, path)

    # Asked for 30 s, it waits api.max_wait (1 s).
    async with asyncio.timeout(10):
        response = await client.get(path, headers=waiting(etag, 30))
    assert response.status == 304
    assert response.headers["ETag"] == etag
    assert response.headers["Preference-Applied"] == "wait=1"


async def test_without_waiting_allowed_an_unchanged_capsule_answers_304_at_once(
    make_client: MakeClient,
) -> None:
    client = await make_client(max_wait=0.0, wait_recheck_interval=NO_RECHECK)
    created = await create(client, zun_template(name="nowait"))
    path = f"/v1/capsules/{created['uuid']}"
    etag = await etag_of(client, path)
    async with asyncio.timeout(10):
        response = await client.get(path, headers=waiting(etag, 60))
    assert response.status == 304
    assert "Preference-Applied" not in response.headers


async def test_a_closed_watch_releases_its_waiters_unchanged(
    store: Store, make_capsule: Callable[..., Capsule]
) -> None:
    watch = CapsuleWatch(store.capsules, store.hub, NO_RECHECK)
    waiter = asyncio.create_task(watch.changed("no-such-capsule", "a version", 60))
    await asyncio.sleep(0)
    # A capsule that does not exist went: the caller reads it again, at once.
    async with asyncio.timeout(10):
        assert await waiter is None

    # One that exists and does not change is released only by the close.
    capsule = make_capsule()
    await store.capsules.create(capsule)
    seen = await state_of(store, capsule.uuid)
    waiter = asyncio.create_task(watch.changed(capsule.uuid, seen.version, 60))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    watch.close()
    async with asyncio.timeout(10):
        assert await waiter is None
    assert await watch.changed(capsule.uuid, seen.version, 60) is None


class CountedLooks:
    """The capsules of each look of a watch at the store."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.looks: list[list[str]] = []
        states_of = store.capsules.states_of

        async def counted(uuids: list[str]) -> dict[str, CapsuleState]:
            self.looks.append(sorted(uuids))
            return await states_of(uuids)

        monkeypatch.setattr(store.capsules, "states_of", counted)

    def take(self) -> list[list[str]]:
        looks, self.looks = self.looks, []
        return looks


async def state_of(store: Store, uuid: str) -> CapsuleState:
    found = await store.capsules.find_state(uuid, None)
    assert found is not None
    return found[1]


async def test_a_wait_for_a_status_is_looked_at_only_after_its_capsule_s_status_changes(
    client: Client, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writes of a start that leave the status (the steps, the container's records) cost
    that waiter no look; a waiter for any change is looked at after every write."""
    watch = CapsuleWatch(store.capsules, store.hub, NO_RECHECK)
    looks = CountedLooks(store, monkeypatch)
    starting, _, _ = await tagged(client, "starting")
    other, _, _ = await tagged(client, "other")
    mark = watch.mark()
    seen = await state_of(store, starting)
    for_running = asyncio.create_task(
        watch.changed(starting, seen.version, 60, frozenset({Status.RUNNING}), since=mark)
    )
    await asyncio.sleep(0.05)
    # Nothing was written since the mark: nothing to look at.
    assert looks.take() == []

    capsule = await store.capsules.get(starting)
    assert capsule is not None
    assert await store.capsules.update_status(starting, task_state=TaskState.CONTAINER_CREATING)
    await store.capsules.update_container(capsule.containers[0].uuid, cri_container_id="c1")
    assert await store.capsules.update_status(other, status=Status.ERROR)
    await asyncio.sleep(0.05)
    assert looks.take() == []
    assert not for_running.done()

    other_seen = await state_of(store, other)
    for_anything = asyncio.create_task(watch.changed(other, other_seen.version, 60))
    await asyncio.sleep(0.05)
    assert looks.take() == [[other]]  # no mark: read once more
    assert not for_anything.done()
    assert await store.capsules.update_status(other, status_reason="a new reason")
    async with asyncio.timeout(10):
        changed = await for_anything
    assert changed == await state_of(store, other)
    assert looks.take() == [[other]]

    assert await store.capsules.update_status(starting, status=Status.RUNNING, task_state=None)
    async with asyncio.timeout(10):
        running = await for_running
    assert running is not None and running.status is Status.RUNNING
    assert running == await state_of(store, starting)
    assert looks.take() == [[starting]]
    watch.close()


async def test_a_write_between_the_mark_and_the_wait_is_not_missed(
    client: Client, store: Store
) -> None:
    watch = CapsuleWatch(store.capsules, store.hub, NO_RECHECK)
    uuid, _, _ = await tagged(client, "quick")
    mark = watch.mark()
    seen = await state_of(store, uuid)
    # The capsule runs between the client's read and its wait.
    assert await store.capsules.update_status(uuid, status=Status.RUNNING)
    async with asyncio.timeout(10):
        running = await watch.changed(uuid, seen.version, 60, frozenset({Status.RUNNING}), mark)
    assert running is not None and running.status is Status.RUNNING
    watch.close()


async def test_a_status_change_in_another_process_answers_through_the_shared_feed(
    tmp_path: Path, make_capsule: Callable[..., Capsule]
) -> None:
    """With the feed on (several hosts on one database), another process's status write
    answers at once, not at the recheck."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    here, there = Store(url, wakeup_poll_interval=0.01), Store(url, wakeup_poll_interval=0.01)
    for store in (here, there):
        await store.open()
    watch = CapsuleWatch(there.capsules, there.hub, NO_RECHECK)
    try:
        capsule = make_capsule()
        await here.capsules.create(capsule)
        mark = watch.mark()
        seen = await state_of(there, capsule.uuid)
        running = asyncio.create_task(
            watch.changed(capsule.uuid, seen.version, 60, frozenset({Status.RUNNING}), mark)
        )
        await asyncio.sleep(0.1)
        assert not running.done()
        assert await here.capsules.update_status(capsule.uuid, status=Status.RUNNING)
        async with asyncio.timeout(10):
            state = await running
        assert state is not None and state.status is Status.RUNNING
    finally:
        watch.close()
        for store in (here, there):
            await store.close()


@pytest.mark.parametrize(
    ("prefer", "expected"),
    [
        (["wait=5"], 5.0),
        (["respond-async, wait=10"], 10.0),
        (["respond-async", "Wait = 7"], 7.0),
        (["wait=100"], 30.0),
        (["wait=0"], 0.0),
        (["wait=abc", "return=minimal"], 0.0),
        (["wait=-1"], 0.0),
        (["wait=²"], 0.0),
        ([], 0.0),
    ],
)
def test_the_preferred_wait_is_read_as_rfc_7240_says_and_bounded(
    prefer: list[str], expected: float
) -> None:
    headers = [("Prefer", value) for value in prefer]
    request: web.Request = make_mocked_request("GET", "/", headers=headers)
    assert preferred_wait(request, 30.0) == expected


@pytest.mark.parametrize(
    ("prefer", "expected"),
    [
        (["wait=5, until-status=Running|Error"], {Status.RUNNING, Status.ERROR}),
        (["wait=5", 'Until-Status = "running"'], {Status.RUNNING}),
        (["until-status=Error, until-status=Running"], {Status.ERROR}),
        (["until-status=Running|Started"], None),
        (["until-status="], None),
        (["wait=5"], None),
        ([], None),
    ],
)
def test_the_awaited_statuses_are_read_from_prefer_and_unknown_ones_ignore_it(
    prefer: list[str], expected: set[Status] | None
) -> None:
    headers = [("Prefer", value) for value in prefer]
    request: web.Request = make_mocked_request("GET", "/", headers=headers)
    assert preferred_statuses(request) == expected
