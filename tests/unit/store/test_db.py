from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.engine import Connection

from capsa.store import Store, schema
from capsa.store.db import SchemaVersionError
from capsa.store.notify import ChangeHub


async def test_a_database_of_another_schema_version_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'capsa.db'}"
    first = Store(url)
    await first.open()
    await first.db.run_write(
        lambda conn: conn.execute(
            update(schema.meta).where(schema.meta.c.key == "schema_version").values(value="999")
        )
    )
    await first.close()

    second = Store(url)
    with pytest.raises(SchemaVersionError, match="999"):
        await second.open()
    await second.close()


async def test_opening_twice_keeps_the_data(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'capsa.db'}"
    for expected in (0, 1):
        s = Store(url)
        await s.open()
        assert len(await s.hosts.all()) == expected
        await s.hosts.register("h1", "http://a", 1, 1, ("runc",))
        await s.close()


async def test_reads_see_every_write_committed_before_them(store: Store) -> None:
    # SQLite transactions run on connections that their threads keep: none may hold on to an
    # old snapshot between transactions.
    value = schema.meta.c.value
    key = schema.meta.c.key == "schema_version"

    async def read(long: bool) -> str:
        return await store.db.run_read(
            lambda conn: conn.execute(select(value).where(key)).scalar_one(), long=long
        )

    for number in map(str, range(20)):
        written = update(schema.meta).where(key).values(value=number)
        await store.db.run_write(lambda conn, written=written: conn.execute(written))
        assert (await read(long=False), await read(long=True)) == (number, number)


async def test_a_connection_that_the_driver_lost_is_replaced(store: Store) -> None:
    def lose(conn: Connection) -> None:
        conn.invalidate()
        raise RuntimeError("lost")

    with pytest.raises(RuntimeError, match="lost"):
        await store.db.run_read(lose)
    assert await store.db.run_read(lambda conn: conn.execute(text("SELECT 1")).scalar()) == 1


async def test_closing_closes_the_kept_connections(tmp_path: Path) -> None:
    s = Store(f"sqlite:///{tmp_path / 'capsa.db'}")
    await s.open()
    await s.hosts.register("h1", "http://a", 1, 1, ("runc",))
    await s.hosts.all()
    kept = list(s.db._kept)
    assert kept
    await s.close()
    assert all(conn.closed for conn in kept)


async def test_wakeups_reach_only_their_topic_and_are_not_lost_before_waiting() -> None:
    hub = ChangeHub()
    a = hub.subscribe("a")
    b = hub.subscribe("b")
    hub.publish("a")
    assert await a.wait(0.05)
    assert not await b.wait(0.01)
    a.close()
    hub.publish("a")
    assert not await a.wait(0.01)


async def test_a_reconciler_stopped_as_it_is_woken_stops() -> None:
    hub = ChangeHub()
    wakeups = hub.subscribe("a")

    async def reconcile_forever() -> None:
        while True:
            await wakeups.wait(3600)

    task = asyncio.create_task(reconcile_forever())
    await asyncio.sleep(0)
    hub.publish("a")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(2):
            await task


async def test_wakeups_name_their_subjects_until_one_names_none() -> None:
    hub = ChangeHub()
    wakeups = hub.subscribe("host:h1")
    hub.publish("host:h1", subject="c1")
    hub.publish("host:h1", subject="c2")
    assert await wakeups.wait(0.05)
    assert wakeups.take_subjects() == {"c1", "c2"}
    assert wakeups.take_subjects() == set()

    hub.publish("host:h1", subject="c3")
    hub.publish("host:h1")
    assert await wakeups.wait(0.05)
    assert wakeups.take_subjects() is None, "a wake-up about nothing asks for a look at all"
