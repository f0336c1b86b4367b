"""The database connection: transactions that are safe under concurrency, run off the event loop.

A transaction is a plain function over a SQLAlchemy Core connection, run whole on one of the
database's threads (:meth:`Database.run_read`, :meth:`Database.run_write`): one hand-off between
the event loop and a thread per transaction, however many statements it runs. Through an asyncio
driver every statement costs several such hand-offs and greenlet switches; a claim measured 1.6 ms
that way and 0.2 ms this way. The event loop never waits on the database's locks or disk.

SQLite needs care to be correct with several writers (tasks in one process, or several processes
sharing the file): a deferred transaction that reads and then writes fails with SQLITE_BUSY when
another writer committed in between, and the busy timeout does not help. Every write transaction
therefore starts with ``BEGIN IMMEDIATE``, which takes the write lock up front and waits for it.
Within one process, writers also queue on an asyncio lock before they take a thread: the next
writer starts as soon as the previous one ends, instead of polling SQLite's busy handler, and a
writer that waits holds no thread.

A transaction whose caller is cancelled runs to its end all the same (it commits or rolls back on
its own): every transaction of the store is whole and idempotent, so that is always safe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

import orjson
from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Connection, CursorResult, Engine, make_url
from sqlalchemy.sql import Executable

from capsa.store import schema

T = TypeVar("T")

_BEGIN_OPTION = "capsa_sqlite_begin"
# Asyncio drivers of the URLs capsa has always written, and the driver that runs in threads.
_SYNC_DRIVERS = {"sqlite+aiosqlite": "sqlite+pysqlite"}
# Threads that run transactions; in one process only one of them writes at a time.
_THREADS = 4


class SchemaVersionError(RuntimeError):
    pass


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        sync_url = make_url(url)
        driver = _SYNC_DRIVERS.get(sync_url.drivername, sync_url.drivername)
        sync_url = sync_url.set(drivername=driver)
        self.is_sqlite = sync_url.get_backend_name() == "sqlite"
        # JSON documents (container specs, labels) are decoded for every row read: orjson is
        # several times faster than the json module at it.
        kwargs: dict[str, Any] = {
            "json_serializer": lambda value: orjson.dumps(value).decode(),
            "json_deserializer": orjson.loads,
            # A connection is never waited for: a transaction that holds one may be waiting for
            # a thread (see read()), and threads waiting for connections would never free one.
            "pool_size": _THREADS,
            "max_overflow": -1,
        }
        if self.is_sqlite:
            # Transactions of one connection may run on different threads, never at once.
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        self.engine: Engine = create_engine(sync_url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=_THREADS, thread_name_prefix="capsa-db"
        )
        self._write_lock = asyncio.Lock() if self.is_sqlite else None

    async def initialize(self) -> None:
        """Creates the tables on a new database; refuses a database of another schema version."""
        await self.run_write(self._create_or_check_schema)

    def _create_or_check_schema(self, conn: Connection) -> None:
        schema.metadata.create_all(conn)
        row = conn.execute(
            select(schema.meta.c.value).where(schema.meta.c.key == "schema_version")
        ).first()
        if row is None:
            conn.execute(
                schema.meta.insert().values(key="schema_version", value=str(schema.SCHEMA_VERSION))
            )
        elif int(row.value) != schema.SCHEMA_VERSION:
            raise SchemaVersionError(
                f"the database at {self.url} has schema version {row.value}, this capsa "
                f"uses {schema.SCHEMA_VERSION}; upgrade capsa or use another database"
            )

    async def run_read(self, work: Callable[[Connection], T]) -> T:
        """Runs ``work`` in a transaction that only reads (a consistent snapshot)."""
        return await self._in_thread(functools.partial(self._transaction, work, False))

    async def run_write(self, work: Callable[[Connection], T]) -> T:
        """Runs ``work`` in a write transaction: committed if it returns, rolled back if it
        raises; on SQLite it holds the write lock from its first statement."""
        release = await self._write_turn()
        return await self._in_thread(functools.partial(self._transaction, work, True), then=release)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Statements]:
        """A read transaction driven statement by statement from the event loop (one hand-off
        per statement); :meth:`run_read` runs a whole transaction in one."""
        async with self._statements(write=False) as statements:
            yield statements

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Statements]:
        """A write transaction driven statement by statement; see :meth:`run_write`."""
        async with self._statements(write=True) as statements:
            yield statements

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._threads.shutdown)
        self.engine.dispose()

    # ---- threads ----

    def _begin(self, write: bool) -> Connection:
        conn = self.engine.connect()
        try:
            if write and self.is_sqlite:
                conn.execution_options(**{_BEGIN_OPTION: "BEGIN IMMEDIATE"})
            conn.begin()
        except BaseException:
            conn.close()
            raise
        return conn

    def _transaction(self, work: Callable[[Connection], T], write: bool) -> T:
        conn = self._begin(write)
        try:
            result = work(conn)
        except BaseException:
            self._end(conn, commit=False)
            raise
        self._end(conn, commit=True)
        return result

    @staticmethod
    def _end(conn: Connection, commit: bool) -> None:
        with conn:
            if commit:
                conn.commit()
            else:
                conn.rollback()

    async def _write_turn(self) -> Callable[[], None] | None:
        """Waits for this process's turn to write; returns what ends the turn."""
        if self._write_lock is None:
            return None
        await self._write_lock.acquire()
        return self._write_lock.release

    async def _in_thread(self, call: Callable[[], T], then: Callable[[], None] | None = None) -> T:
        """Runs ``call`` on a database thread, then ``then`` on the event loop. A cancelled
        caller stops waiting; the call runs to its end all the same (see the module's doc)."""
        future = asyncio.get_running_loop().run_in_executor(self._threads, call)
        future.add_done_callback(functools.partial(_finished, then))
        return await asyncio.shield(future)

    @asynccontextmanager
    async def _statements(self, write: bool) -> AsyncIterator[Statements]:
        release = await self._write_turn() if write else None
        loop = asyncio.get_running_loop()
        began = loop.run_in_executor(self._threads, self._begin, write)
        try:
            conn = await asyncio.shield(began)
        except BaseException:
            # Whatever the thread began must still end, or it would hold its locks for ever.
            began.add_done_callback(functools.partial(self._end_abandoned, loop, release))
            raise
        try:
            yield Statements(self, conn)
        except BaseException:
            await self._in_thread(functools.partial(self._end, conn, False), then=release)
            raise
        await self._in_thread(functools.partial(self._end, conn, True), then=release)

    def _end_abandoned(
        self,
        loop: asyncio.AbstractEventLoop,
        release: Callable[[], None] | None,
        began: asyncio.Future[Connection],
    ) -> None:
        if began.cancelled() or began.exception() is not None:
            if release is not None:
                release()
            return
        ending = loop.run_in_executor(self._threads, self._end, began.result(), False)
        ending.add_done_callback(functools.partial(_finished, release))


class Statements:
    """A transaction open on one of the database's threads, one statement at a time."""

    def __init__(self, db: Database, conn: Connection) -> None:
        self._db = db
        self._conn = conn

    async def execute(
        self, statement: Executable, parameters: Any = None
    ) -> CursorResult[*tuple[Any, ...]]:
        """The statement's result, its rows already fetched."""
        return await self._db._in_thread(
            functools.partial(_execute_buffered, self._conn, statement, parameters)
        )


def _execute_buffered(
    conn: Connection, statement: Executable, parameters: Any
) -> CursorResult[*tuple[Any, ...]]:
    result = conn.execute(statement, parameters)
    if result.returns_rows:
        # Fetched here, on the thread that owns the connection: the rows outlive it.
        return cast("CursorResult[*tuple[Any, ...]]", result.freeze()())
    return result


def _finished(then: Callable[[], None] | None, future: asyncio.Future[Any]) -> None:
    if then is not None:
        then()
    # Marks a failure as seen: a caller that was cancelled no longer wants it, and one that
    # waits gets it from its own await.
    if not future.cancelled():
        future.exception()


def _configure_sqlite(engine: Engine) -> None:
    # pysqlite's own transaction handling would defer BEGIN; capsa emits BEGIN itself instead.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get(_BEGIN_OPTION, "BEGIN"))
