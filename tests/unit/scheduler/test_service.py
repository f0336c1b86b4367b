from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace

from capsa.model.capsule import Capsule, Status
from capsa.scheduler.service import Scheduler
from capsa.store import Store, notify

CapsuleFactory = Callable[..., Capsule]


async def test_waiting_capsules_are_spread_and_the_rest_get_a_reason(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 4096, ("runc",))
    await store.hosts.register("h2", "http://h2", 1000, 4096, ("runc",))
    capsules = [await store.capsules.create(make_capsule(cpu_millis=300)) for _ in range(7)]

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
        capsule = await store.capsules.create(make_capsule())
        assert await agent.wait(2.0), "the host's agent was not woken"
        stored = await store.capsules.get(capsule.uuid)
        assert stored is not None and stored.host == "h1"
    finally:
        await scheduler.stop()


async def test_hosts_that_stopped_reporting_get_nothing(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    await store.hosts.register("h1", "http://h1", 1000, 4096, ("runc",))
    capsule = await store.capsules.create(make_capsule())
    await asyncio.sleep(0.05)

    assert await Scheduler(store, 10, host_timeout=0.01).schedule_pending() == 0
    stored = await store.capsules.get(capsule.uuid)
    assert stored is not None and stored.status_reason is not None
    assert "no compute host is up" in stored.status_reason
