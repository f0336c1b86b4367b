from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import bindparam, select, text, update
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy.engine import Connection

from capsa.store import Store, db, notify, schema
from capsa.store.db import DriverStatement, SchemaVersionError
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

    alone = DriverStatement(select(value).where(schema.meta.c.key == bindparam("key")))
    for number in map(str, range(20)):
        written = update(schema.meta).where(key).values(value=number)
        await store.db.run_write(lambda conn, written=written: conn.execute(written))
        assert (await read(long=False), await read(long=True)) == (number, number)
        assert await asyncio.to_thread(
            store.db.read_rows_blocking, alone, {"key": "schema_version"}
        ) == [(number,)]


_HOSTS = schema.hosts.c
# A statement with a literal of its own ("h1") and named parameters, a Timestamp and a JSON
# document among them.
_HEARTBEAT = DriverStatement(
    update(schema.hosts)
    .where(_HOSTS.name == "h1")
    .values(heartbeat_at=bindparam("at"), runtimes=bindparam("runtimes"))
    .returning(_HOSTS.agent_url, _HOSTS.cpu_millis)
)


async def test_a_driver_statement_binds_as_sqlalchemy_does_and_returns_plain_rows(
    store: Store,
) -> None:
    await store.hosts.register("h1", "http://a", 1000, 512, ("runc",))
    await store.hosts.register("h2", "http://b", 2000, 512, ("runc",))
    at = datetime(2026, 12, 1, 14, 30, 5, 123456)
    rows = await store.db.run_write(
        lambda conn: _HEARTBEAT.rows(conn, {"at": at, "runtimes": ["runc", "runsc"]})
    )
    assert rows == [("http://a", 1000)] and type(rows[0]) is tuple
    # Read back through SQLAlchemy: each value was bound as its type binds it, h2 untouched.
    read = select(_HOSTS.heartbeat_at, _HOSTS.runtimes).order_by(_HOSTS.name)
    h1, h2 = await store.db.run_read(lambda conn: conn.execute(read).all())
    assert tuple(h1) == (at, ["runc", "runsc"])
    assert h2.heartbeat_at != at and h2.runtimes == ["runc"]
    many = DriverStatement(
        update(schema.hosts)
        .where(_HOSTS.name == bindparam("host"))
        .values(memory_mb=bindparam("mb"))
    )
    await store.db.run_write(
        lambda conn: many.run_many(conn, [{"host": "h1", "mb": 1}, {"host": "h2", "mb": 2}])
    )
    memory = DriverStatement(select(_HOSTS.memory_mb).order_by(_HOSTS.name))
    assert await asyncio.to_thread(store.db.read_rows_blocking, memory, {}) == [(1,), (2,)]


async def test_a_driver_statement_refuses_columns_whose_values_sqlalchemy_converts(
    store: Store,
) -> None:
    await store.hosts.register("h1", "http://a", 1000, 512, ("runc",))
    for column in (_HOSTS.heartbeat_at, _HOSTS.disabled, _HOSTS.runtimes):
        with pytest.raises(TypeError, match="needs SQLAlchemy to convert"):
            await asyncio.to_thread(
                store.db.read_rows_blocking, DriverStatement(select(column)), {}
            )


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


_VALUE = schema.meta.c.value
_VERSION_KEY = schema.meta.c.key == "schema_version"


def _set_version(value: str) -> Callable[[Connection], str]:
    """A write that records the thread it ran on and sets the schema_version row to ``value``."""

    def work(conn: Connection) -> str:
        conn.execute(update(schema.meta).where(_VERSION_KEY).values(value=value))
        return threading.current_thread().name

    return work


async def test_sqlite_writes_run_on_the_event_loop(store: Store) -> None:
    ran_on = await store.db.run_write(_set_version("1"))
    assert ran_on == threading.current_thread().name


async def test_a_write_that_finds_the_lock_taken_by_another_process_waits_on_a_thread(
    store: Store, tmp_path: Path
) -> None:
    await store.db.run_write(_set_version("1"))  # the loop's writer exists and is set up
    other = sqlite3.connect(tmp_path / "capsa.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        write = asyncio.create_task(store.db.run_write(_set_version("2")))
        # The loop goes on while the write waits for the lock.
        for _ in range(5):
            await asyncio.sleep(0.01)
        assert not write.done()
        other.execute("COMMIT")
        ran_on = await asyncio.wait_for(write, 10)
    finally:
        other.close()
    assert ran_on != threading.current_thread().name
    assert ran_on.startswith("capsa-db")
    read = await store.db.run_read(lambda conn: conn.execute(select(_VALUE).where(_VERSION_KEY)))
    assert read.scalar_one() == "2"
    # The next write, with the lock free, is back on the loop.
    assert await store.db.run_write(_set_version("3")) == threading.current_thread().name


async def test_the_log_is_checkpointed_on_a_thread_not_by_the_loops_writer(
    store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(db, "_CHECKPOINT_EVERY", 5)
    checkpoints: list[str] = []
    checkpoint_wal = store.db._checkpoint_wal

    def recorded() -> None:
        checkpoints.append(threading.current_thread().name)
        checkpoint_wal()

    # The database file itself changes only when a checkpoint copies the log into it.
    database_file = tmp_path / "capsa.db"
    checkpoint_wal()  # what opening the store wrote
    before = database_file.read_bytes()
    monkeypatch.setattr(store.db, "_checkpoint_wal", recorded)
    monkeypatch.setattr(store.db, "_writes_here", 0)
    for number in range(4):
        await store.db.run_write(_set_version(str(number)))
    assert checkpoints == []
    assert database_file.read_bytes() == before
    await store.db.run_write(_set_version("4"))
    checkpoint = store.db._checkpoint
    assert checkpoint is not None
    await checkpoint
    assert len(checkpoints) == 1 and checkpoints[0].startswith("capsa-db")
    assert database_file.read_bytes() != before
    writer = db._sqlite_driver(store.db._kept_connection(write=True, here=True))
    assert writer.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)


async def test_a_blocking_write_runs_on_its_thread_wakes_on_the_loop_and_never_checkpoints(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "_CHECKPOINT_EVERY", 3)
    monkeypatch.setattr(store.db, "_writes_here", 0)
    woken = store.db.hub.subscribe(notify.NETWORK)

    def waking(value: str) -> Callable[[Connection], str]:
        set_version = _set_version(value)

        def work(conn: Connection) -> str:
            notify.wake(conn, notify.NETWORK)
            return set_version(conn)

        return work

    def blocking_writes() -> tuple[list[str], int]:
        ran_on = [store.db.run_write_blocking(waking(str(n))) for n in range(2)]
        writer = db._sqlite_driver(store.db._kept_connection(write=True))
        return ran_on, writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0]

    ran_on, autocheckpoint = await asyncio.to_thread(blocking_writes)

    assert ran_on[0] == ran_on[1] != threading.current_thread().name
    assert autocheckpoint == 0
    assert await woken.wait(5)
    read = await store.db.run_read(lambda conn: conn.execute(select(_VALUE).where(_VERSION_KEY)))
    assert read.scalar_one() == "1"
    # Counted with the loop's writes: the third write is due a checkpoint, on a thread.
    assert store.db._checkpoint is None
    await store.db.run_write(_set_version("2"))
    checkpoint = store.db._checkpoint
    assert checkpoint is not None
    await checkpoint


_SET_VERSION_ON_DRIVER = DriverStatement(
    update(schema.meta).where(_VERSION_KEY).values(value=bindparam("value"))
)


def _version_on_driver(value: str) -> Callable[[Connection], None]:
    """A write that sets the schema_version row to ``value`` with a driver statement."""
    return lambda conn: _SET_VERSION_ON_DRIVER.run_many(conn, [{"value": value}])


async def _version(store: Store) -> str:
    read = await store.db.run_read(lambda conn: conn.execute(select(_VALUE).where(_VERSION_KEY)))
    return str(read.scalar_one())


async def test_a_blocking_write_of_driver_statements_is_begun_and_committed_by_the_driver(
    store: Store, tmp_path: Path
) -> None:
    begun_by_sqlalchemy: list[Connection] = []
    sqlalchemy_event.listen(store.db.engine, "begin", begun_by_sqlalchemy.append)
    other = sqlite3.connect(
        tmp_path / "capsa.db", isolation_level=None, timeout=0, check_same_thread=False
    )
    lock_taken: list[bool] = []

    def work(conn: Connection) -> None:
        # BEGIN IMMEDIATE: the write lock is the transaction's before its first statement.
        try:
            other.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            lock_taken.append("locked" in str(exc))
        else:
            other.execute("ROLLBACK")
            lock_taken.append(False)
        _version_on_driver("7")(conn)

    try:
        await asyncio.to_thread(store.db.run_write_blocking, work)
    finally:
        other.close()
    assert lock_taken == [True]
    assert begun_by_sqlalchemy == []
    assert await _version(store) == "7"
    # Work that runs a statement through SQLAlchemy joins the driver's transaction.
    begun_by_sqlalchemy.clear()
    await asyncio.to_thread(store.db.run_write_blocking, _set_version("8"))
    assert len(begun_by_sqlalchemy) == 1
    assert await _version(store) == "8"


@pytest.mark.parametrize("through_sqlalchemy", [False, True], ids=["driver", "sqlalchemy"])
async def test_a_blocking_write_that_fails_leaves_nothing_and_the_next_one_commits(
    store: Store, through_sqlalchemy: bool
) -> None:
    await store.db.run_write(_set_version("1"))
    write = _set_version("2") if through_sqlalchemy else _version_on_driver("2")

    def failing(conn: Connection) -> None:
        write(conn)
        notify.wake(conn, notify.NETWORK)
        raise RuntimeError("failed after its write")

    with pytest.raises(RuntimeError, match="after its write"):
        await asyncio.to_thread(store.db.run_write_blocking, failing)
    assert await _version(store) == "1"
    await asyncio.to_thread(store.db.run_write_blocking, _version_on_driver("3"))
    assert await _version(store) == "3"


async def test_a_blocking_write_after_one_that_lost_its_connection_commits(store: Store) -> None:
    def lose(conn: Connection) -> None:
        _version_on_driver("2")(conn)
        conn.invalidate()
        raise RuntimeError("lost")

    await store.db.run_write(_set_version("1"))
    with pytest.raises(RuntimeError, match="lost"):
        await asyncio.to_thread(store.db.run_write_blocking, lose)
    assert await _version(store) == "1"
    await asyncio.to_thread(store.db.run_write_blocking, _version_on_driver("3"))
    assert await _version(store) == "3"


async def test_the_loops_writer_is_set_up_again_after_the_driver_lost_its_connection(
    store: Store,
) -> None:
    def lose(conn: Connection) -> None:
        conn.invalidate()
        raise RuntimeError("lost")

    await store.db.run_write(_set_version("1"))
    with pytest.raises(RuntimeError, match="lost"):
        await store.db.run_write(lose)
    assert await store.db.run_write(_set_version("2")) == threading.current_thread().name
    writer = db._sqlite_driver(store.db._kept_connection(write=True, here=True))
    assert writer.execute("PRAGMA busy_timeout").fetchone() == (0,)


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


async def test_a_subscription_to_several_topics_keeps_each_topic_s_subjects() -> None:
    hub = ChangeHub()
    both = hub.subscribe("a", "b")
    before = hub.published
    hub.publish("a")
    hub.publish("b", subject="c1")
    assert hub.published == before + 2
    assert await both.wait(0.05)
    assert both.take_subjects("a") is None
    assert both.take_subjects("b") == {"c1"}
    # A nudge wakes it and names nothing.
    both.nudge()
    assert await both.wait(0.05)
    assert both.take_subjects("a") == both.take_subjects("b") == set()
    both.close()
    hub.publish("b", subject="c2")
    assert not await both.wait(0.01)
