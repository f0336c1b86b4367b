from __future__ import annotations

import asyncio
from collections.abc import Callable

from capsa.model.capsule import Capsule
from capsa.model.host import Claim, ClaimOutcome
from capsa.store import Store, notify

CapsuleFactory = Callable[..., Capsule]


async def test_register_keeps_claims_across_restarts(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.hosts.register("h1", "http://a", 1000, 512, ("runc",))
    capsule = make_capsule()
    await store.capsules.create(capsule)
    assert await store.hosts.claim(capsule.uuid, "h1", 100, 64)

    again = await store.hosts.register("h1", "http://b", 2000, 1024, ("runc", "crun"))

    assert (again.cpu_millis_used, again.memory_mb_used) == (100, 64)
    assert again.agent_url == "http://b"
    assert again.runtimes == ("runc", "crun")
    assert [h.name for h in await store.hosts.all()] == ["h1"]


async def test_concurrent_claims_never_overcommit_a_host(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.hosts.register("h1", "http://a", 1000, 10_000, ("runc",))
    capsules = [make_capsule() for _ in range(25)]
    for capsule in capsules:
        await store.capsules.create(capsule)

    results = await asyncio.gather(*(store.hosts.claim(c.uuid, "h1", 100, 64) for c in capsules))

    assert results.count(True) == 10
    host = await store.hosts.get("h1")
    assert host is not None
    assert host.cpu_millis_used == 1000
    assert host.memory_mb_used == 10 * 64
    placed = await store.capsules.list_for_host("h1")
    assert len(placed) == 10


async def test_a_capsule_is_claimed_once_even_when_asked_twice(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.hosts.register("h1", "http://a", 1000, 1000, ("runc",))
    await store.hosts.register("h2", "http://b", 1000, 1000, ("runc",))
    capsule = make_capsule()
    await store.capsules.create(capsule)

    first, second = await asyncio.gather(
        store.hosts.claim(capsule.uuid, "h1", 100, 64),
        store.hosts.claim(capsule.uuid, "h2", 100, 64),
    )

    assert [first, second].count(True) == 1
    used = [(h.name, h.cpu_millis_used) for h in await store.hosts.all()]
    assert sorted(u for _, u in used) == [0, 100], "the losing claim must be rolled back"


async def test_a_deleted_capsule_cannot_be_claimed(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.hosts.register("h1", "http://a", 1000, 1000, ("runc",))
    capsule = make_capsule()
    await store.capsules.create(capsule)
    await store.capsules.request_delete(capsule.uuid)

    assert not await store.hosts.claim(capsule.uuid, "h1", 100, 64)
    host = await store.hosts.get("h1")
    assert host is not None and host.cpu_millis_used == 0


async def test_a_batch_of_claims_has_an_outcome_each_and_only_placed_ones_hold_room(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.hosts.register("h1", "http://a", 250, 1000, ("runc",))
    placed, gone, no_room = [make_capsule() for _ in range(3)]
    for capsule in (placed, gone, no_room):
        await store.capsules.create(capsule)
    await store.capsules.request_delete(gone.uuid)
    woken = store.hub.subscribe(notify.host_topic("h1"))

    outcomes = await store.hosts.claim_many(
        [
            Claim(c.uuid, "h1", 200, 64) if c is no_room else Claim(c.uuid, "h1", 100, 64)
            for c in (placed, gone, no_room)
        ]
    )

    assert outcomes == [ClaimOutcome.PLACED, ClaimOutcome.CAPSULE_GONE, ClaimOutcome.NO_ROOM]
    host = await store.hosts.get("h1")
    assert host is not None and (host.cpu_millis_used, host.memory_mb_used) == (100, 64)
    assert [c.uuid for c in await store.capsules.list_for_host("h1")] == [placed.uuid]
    assert await woken.wait(0.1)


async def test_failed_placement_records_the_reason(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    capsule = make_capsule()
    await store.capsules.create(capsule)
    assert await store.hosts.fail_placement(capsule.uuid, "no host has room")
    stored = await store.capsules.get(capsule.uuid)
    assert stored is not None
    assert (stored.status, stored.status_reason) == ("Error", "no host has room")
    assert stored.task_state is None
