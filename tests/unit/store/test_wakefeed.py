"""Wake-ups across processes: two stores on one SQLite file stand for two processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Connection

from capsa.model.capsule import Capsule
from capsa.model.clock import utcnow
from capsa.store import Store, notify, schema
from capsa.store.wakefeed import GAP_GRACE, RETENTION, WakeupFollower

CapsuleFactory = Callable[..., Capsule]
# Bounds the waits for a wake-up that must come; the test never depends on how fast it comes.
WAIT = 10.0


@pytest.fixture
async def two_processes(tmp_path: Path) -> AsyncIterator[tuple[Store, Store]]:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    stores = [Store(url, wakeup_poll_interval=0.01) for _ in range(2)]
    for store in stores:
        await store.open()
    try:
        yield stores[0], stores[1]
    finally:
        for store in stores:
            await store.close()


async def test_a_change_in_one_process_wakes_the_others_reconcilers_with_its_subject(
    two_processes: tuple[Store, Store], make_capsule: CapsuleFactory
) -> None:
    here, there = two_processes
    scheduler = there.hub.subscribe(notify.SCHEDULER)
    agent = there.hub.subscribe(notify.host_topic("h1"))

    await here.hosts.register("h1", "http://h1", 1000, 1000, ("runc",))
    capsule = make_capsule()
    await here.capsules.create(capsule)
    assert await scheduler.wait(WAIT)
    assert await here.hosts.claim(capsule.uuid, "h1", 100, 64)

    assert await agent.wait(WAIT)
    assert agent.take_subjects() == {capsule.uuid}


async def test_a_blocking_write_wakes_the_other_processes_reconcilers(
    two_processes: tuple[Store, Store],
) -> None:
    # The CNI daemon's writes: begun and committed by the driver, the feed's row written in them
    # through SQLAlchemy all the same.
    here, there = two_processes
    network = there.hub.subscribe(notify.NETWORK)

    def work(conn: Connection) -> None:
        notify.wake(conn, notify.NETWORK, subject="port-1")

    await asyncio.to_thread(here.db.run_write_blocking, work)
    assert await network.wait(WAIT)
    assert network.take_subjects() == {"port-1"}


async def test_a_process_publishes_its_own_wakeups_once(
    two_processes: tuple[Store, Store], make_capsule: CapsuleFactory
) -> None:
    here, there = two_processes
    await here.capsules.create(make_capsule())
    own, others = WakeupFollower(here.db, 1.0), WakeupFollower(there.db, 1.0)
    assert await own.follow_once() == 0
    assert await others.follow_once() == 1


async def test_a_change_that_rolls_back_wakes_nobody(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'capsa.db'}", wakeup_poll_interval=1.0)
    await store.open()
    try:
        woken = store.hub.subscribe(notify.NETWORK)

        def fails(conn: Connection) -> None:
            notify.wake(conn, notify.NETWORK)
            raise RuntimeError("refused")

        with pytest.raises(RuntimeError):
            await store.db.run_write(fails)
        assert not await woken.wait(0.05)
        assert await rows(store) == []
    finally:
        await store.close()


async def test_wakeups_within_a_process_write_nothing(
    store: Store, make_capsule: CapsuleFactory
) -> None:
    woken = store.hub.subscribe(notify.SCHEDULER)
    await store.capsules.create(make_capsule())
    assert await woken.wait(WAIT)
    assert await rows(store) == []


async def test_a_wakeup_only_a_transaction_gives(store: Store) -> None:
    with pytest.raises(RuntimeError, match="write transactions"):
        await store.db.run_read(lambda conn: notify.wake(conn, notify.NETWORK))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def insert(store: Store, seq: int, topic: str = notify.NETWORK) -> None:
    """A wake-up of another process, with the number it drew."""
    row = {"seq": seq, "topic": topic, "origin": "elsewhere", "created_at": utcnow()}
    await store.db.run_write(lambda conn: conn.execute(schema.wakeups.insert(), [row]))


async def test_a_number_that_commits_after_larger_ones_is_still_delivered(store: Store) -> None:
    # PostgreSQL: a transaction that drew 2 commits after the one that drew 3.
    follower = WakeupFollower(store.db, 1.0, clock=Clock())
    await insert(store, 1)
    await insert(store, 3)
    assert await follower.follow_once() == 2
    await insert(store, 2)
    assert await follower.follow_once() == 1
    assert await follower.follow_once() == 0


async def test_a_number_that_never_commits_is_given_up_after_the_grace(store: Store) -> None:
    clock = Clock()
    follower = WakeupFollower(store.db, 1.0, clock=clock)
    await insert(store, 1)
    await insert(store, 3)
    assert await follower.follow_once() == 2
    clock.now += GAP_GRACE + 1
    assert await follower.follow_once() == 0
    # Too late: the follower has moved past it, and reads only after 3 now.
    await insert(store, 2)
    await insert(store, 4)
    assert await follower.follow_once() == 1


async def test_old_wakeups_are_pruned(store: Store) -> None:
    old = utcnow() - timedelta(seconds=RETENTION + 5)
    wakeups = [
        {"topic": "a", "origin": "elsewhere", "created_at": old},
        {"topic": "b", "origin": "elsewhere", "created_at": utcnow()},
    ]
    await store.db.run_write(lambda conn: conn.execute(schema.wakeups.insert(), wakeups))
    await WakeupFollower(store.db, 1.0).prune()
    assert [topic for _, topic in await rows(store)] == ["b"]


async def rows(store: Store) -> list[tuple[int, str]]:
    query = select(schema.wakeups.c.seq, schema.wakeups.c.topic).order_by(schema.wakeups.c.seq)
    return [
        (seq, topic) for seq, topic in await store.db.run_read(lambda c: c.execute(query).all())
    ]
