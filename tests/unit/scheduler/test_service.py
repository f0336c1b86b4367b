from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from capsa.model.capsule import Capsule, Status
from capsa.model.clock import utcnow
from capsa.model.host import Host
from capsa.scheduler.service import Scheduler
from capsa.store import Store, notify

CapsuleFactory = Callable[..., Capsule]


async def test_waiting_capsules_are_spread_and_the_rest_get_a_reason(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 4096, ("runc",))
    await store.hosts.register("h2", "http://h2", 1000, 4096, ("runc",))
    capsules = [make_capsule(cpu_millis=300) for _ in range(7)]
    for capsule in capsules:
        await store.capsules.create(capsule)

    placed = await Scheduler(store, 10, 60).schedule_pending()

    assert placed == 6
    hosts = {h.name: h for h in await store.hosts.all()}
    assert hosts["h1"].cpu_millis_used == hosts["h2"].cpu_millis_used == 900
    statuses = [await store.capsules.get(c.uuid) for c in capsules]
    errors = [c for c in statuses if c is not None and c.status is Status.ERROR]
    assert len(errors) == 1
    assert errors[0].status_reason is not None
    assert "needs 0.3 cpu" in errors[0].status_reason
    assert errors[0].host is None


async def test_a_capsule_asking_for_a_missing_runtime_fails_with_the_runtimes_offered(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 4096, ("runc",))
    capsule = make_capsule()
    capsule.spec = replace(capsule.spec, runtime="runsc")
    await store.capsules.create(capsule)

    assert await Scheduler(store, 10, 60).schedule_pending() == 0

    stored = await store.capsules.get(capsule.uuid)
    assert stored is not None and stored.status is Status.ERROR
    assert stored.status_reason is not None and "offer the runtimes runc" in stored.status_reason


async def test_the_running_scheduler_places_a_new_capsule_without_waiting_for_resync(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 4096, ("runc",))
    agent = store.hub.subscribe(notify.host_topic("h1"))
    scheduler = Scheduler(store, resync_interval=3600, host_timeout=60)
    await scheduler.start()
    try:
        capsule = make_capsule()
        await store.capsules.create(capsule)
        assert await agent.wait(2.0), "the host's agent was not woken"
        stored = await store.capsules.get(capsule.uuid)
        assert stored is not None and stored.host == "h1"
    finally:
        await scheduler.stop()


async def test_hosts_that_stopped_reporting_get_nothing(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 4096, ("runc",))
    capsule = make_capsule()
    await store.capsules.create(capsule)
    await asyncio.sleep(0.05)

    assert await Scheduler(store, 10, host_timeout=0.01).schedule_pending() == 0
    stored = await store.capsules.get(capsule.uuid)
    assert stored is not None and stored.status_reason is not None
    assert "no compute host is up" in stored.status_reason


async def test_a_pass_over_its_subjects_places_them_and_leaves_the_others_to_a_full_pass(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 4096, ("runc",))
    named = make_capsule()
    await store.capsules.create(named)
    other = make_capsule()
    await store.capsules.create(other)
    scheduler = Scheduler(store, 10, 60)

    assert await scheduler.schedule_pending({named.uuid}) == 1

    placed, waiting = await store.capsules.get(named.uuid), await store.capsules.get(other.uuid)
    assert placed is not None and placed.host == "h1"
    assert waiting is not None and waiting.host is None and waiting.status is Status.CREATING
    assert await scheduler.schedule_pending(set()) == 0
    assert await scheduler.schedule_pending() == 1
    waiting = await store.capsules.get(other.uuid)
    assert waiting is not None and waiting.host == "h1"


async def test_a_pass_over_subjects_sees_host_changes_since_the_last_pass(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 4096, ("runc",))
    scheduler = Scheduler(store, 10, 60)
    first = make_capsule(cpu_millis=600)
    await store.capsules.create(first)
    assert await scheduler.schedule_pending() == 1
    # Room given back and a new, roomier host: the kept view catches up with both.
    await store.hosts.register("h2", "http://h2", 4000, 4096, ("runc",))
    second = make_capsule(cpu_millis=600)
    await store.capsules.create(second)
    assert await scheduler.schedule_pending({second.uuid}) == 1
    assert await store.capsules.remove(first.uuid)
    third = make_capsule(cpu_millis=1000)
    await store.capsules.create(third)
    assert await scheduler.schedule_pending({third.uuid}) == 1

    hosts = {h.name: h for h in await store.hosts.all()}
    assert hosts["h1"].cpu_millis_used == 1000 and hosts["h2"].cpu_millis_used == 600


async def test_a_pass_over_subjects_leaves_a_capsule_without_room_to_a_full_pass(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 4096, ("runc",))
    scheduler = Scheduler(store, 10, 60)
    big = make_capsule(cpu_millis=2000)
    await store.capsules.create(big)

    assert await scheduler.schedule_pending({big.uuid}) == 0
    waiting = await store.capsules.get(big.uuid)
    assert waiting is not None and waiting.status is Status.CREATING

    assert await scheduler.schedule_pending() == 0
    failed = await store.capsules.get(big.uuid)
    assert failed is not None and failed.status is Status.ERROR


async def test_a_kept_view_never_places_on_a_host_that_stopped_reporting(
    store: Store, make_capsule: CapsuleFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 4096, ("runc",))
    scheduler = Scheduler(store, 10, host_timeout=60)
    assert await store.capsules.create(make_capsule())
    assert await scheduler.schedule_pending() == 1
    # Two minutes later by the scheduler's clock, h1 has not reported since.
    later = utcnow() + timedelta(minutes=2)
    monkeypatch.setattr("capsa.scheduler.service.utcnow", lambda: later)

    late = make_capsule()

    await store.capsules.create(late)
    assert await scheduler.schedule_pending({late.uuid}) == 0
    waiting = await store.capsules.get(late.uuid)
    assert waiting is not None and waiting.host is None


async def test_a_lost_claim_makes_the_running_scheduler_read_the_hosts_again(
    store: Store, make_capsule: CapsuleFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 4096, ("runc",))
    await store.hosts.register("h2", "http://h2", 1000, 4096, ("runc",))
    # Changes that the kept view's catch-up misses (another host's clock, say): only a full
    # read of the hosts shows them.
    monkeypatch.setattr(store.hosts, "changed_since", _nothing_changed)
    scheduler = Scheduler(store, resync_interval=3600, host_timeout=60)
    await scheduler.start()
    # Another process (its own hub: no wake-up here) takes h2's room and adds a host.
    elsewhere = Store(f"sqlite:///{tmp_path / 'capsa.db'}")
    await elsewhere.open()
    try:
        first = make_capsule(cpu_millis=600)
        await store.capsules.create(first)
        h1 = store.hub.subscribe(notify.host_topic("h1"))
        assert await h1.wait(2.0), "the first capsule was not placed"
        taken = make_capsule(cpu_millis=600)
        await elsewhere.capsules.create(taken)
        assert await elsewhere.hosts.claim(taken.uuid, "h2", 600, 64)
        await elsewhere.hosts.register("h3", "http://h3", 1000, 4096, ("runc",))
        h3 = store.hub.subscribe(notify.host_topic("h3"))

        # The view says h2 is empty; its claim finds no room, and the pass after it reads h3.
        late = make_capsule(cpu_millis=600)
        await store.capsules.create(late)
        assert await h3.wait(2.0), "the view was not read again after the lost claim"
    finally:
        await scheduler.stop()
        await elsewhere.close()
    placed = {
        c.uuid: c.host for c in [await store.capsules.get(u) for u in (first.uuid, late.uuid)] if c
    }
    assert placed == {first.uuid: "h1", late.uuid: "h3"}


async def _nothing_changed(since: datetime) -> list[Host]:
    return []
