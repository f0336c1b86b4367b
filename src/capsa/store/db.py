"""The database connection: transactions that are safe under concurrency.

A transaction is a plain function over a SQLAlchemy Core connection, run whole
(:meth:`Database.run_read`, :meth:`Database.run_write`). On PostgreSQL it runs on one of the
database's threads: one hand-off between the event loop and a thread per transaction, however
many statements it runs (through an asyncio driver every statement costs several such hand-offs
and greenlet switches). On SQLite, short reads and writes run right on the event loop, where
they take less time than a hand-off's round trip and its wait for the GIL (see run_read and
run_write), and each thread keeps its own connections instead of taking one from the pool per
transaction: the checkout and the reset on return cost about 0.1 ms, as much as a small read
itself. The event loop never waits on the database's locks: a write that finds SQLite's write
lock taken by another process goes to a thread to wait for it, and the write-ahead log is
checkpointed (which syncs the disk) on a thread.

SQLite needs care to be correct with several writers (tasks in one process, or several processes
sharing the file): a deferred transaction that reads and then writes fails with SQLITE_BUSY when
another writer committed in between, and the busy timeout does not help. Every write transaction
therefore starts with ``BEGIN IMMEDIATE``, which takes the write lock up front (and, on a
thread, waits for it). Within one process, writers also queue on an asyncio lock: the next writer
starts as soon as the previous one ends, never against another of this process's writers, and a
writer that waits holds no thread.

A transaction whose caller is cancelled runs to its end all the same (it commits or rolls back on
its own): every transaction of the store is whole and idempotent, so that is always safe.

A write transaction names the wake-ups its change gives (:func:`capsa.store.notify.wake`); they go
to this process's hub once it commits, whether its caller still waits or not, and with
``shared_wakeups`` they are also written in the transaction for the other processes
(:mod:`capsa.store.wakefeed`). They go one turn of the event loop after the commit, once the
caller has taken its next step: the woken reconcilers (a network agent's pass holds the loop for
milliseconds) start after, say, a CNI DEL has sent its answer, not between its write and it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import secrets
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from sqlalchemy import Table, create_engine, event, select
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection, Dialect, Engine, make_url
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import Select, Update

from capsa.log import get_logger
from capsa.store import notify, schema, wakefeed

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql

T = TypeVar("T")

log = get_logger(__name__)

_BEGIN_OPTION = "capsa_sqlite_begin"
# Set in a connection's info while the driver runs a transaction of its own on it
# (Database._driver_write_transaction).
_DRIVER_TRANSACTION = "capsa_driver_transaction"
# Threads that run transactions; in one process only one of them writes at a time.
_THREADS = 4
# SQLite: writes on the event loop between two checkpoints of the write-ahead log on a thread
# (a commit adds a few pages; SQLite's own checkpoint, which the loop's writer has turned off,
# comes at 1,000).
_CHECKPOINT_EVERY = 200
# What the loop's SQLite writer runs on each new driver connection: it never waits for the
# write lock (another process's write goes to a thread instead) and never checkpoints.
_WRITER_HERE_PRAGMAS = ("PRAGMA busy_timeout=0", "PRAGMA wal_autocheckpoint=0")


class _Busy:
    """Another process holds SQLite's write lock."""


_BUSY = _Busy()


class SchemaVersionError(RuntimeError):
    pass


class Database:
    """``hub`` wakes this process's reconcilers after each commit; ``shared_wakeups`` also
    writes the wake-ups into the database, for the other processes that follow it."""

    def __init__(
        self, url: str, hub: notify.ChangeHub | None = None, *, shared_wakeups: bool = False
    ) -> None:
        self.url = url
        self.hub = hub or notify.ChangeHub()
        self.shared_wakeups = shared_wakeups
        # Who wrote a wake-up: a process skips its own, which it published already.
        self.origin = secrets.token_hex(8)
        self.is_sqlite = make_url(url).get_backend_name() == "sqlite"
        # JSON documents (container specs, labels) are decoded for every row read: orjson is
        # several times faster than the json module at it.
        kwargs: dict[str, Any] = {
            "json_serializer": lambda value: orjson.dumps(value).decode(),
            "json_deserializer": orjson.loads,
            # A connection per database thread and one for the event loop's reads: a
            # transaction never waits for a connection.
            "pool_size": _THREADS + 1,
        }
        if self.is_sqlite:
            # Each thread keeps a reader and a writer (see _kept_connection); close() closes them
            # all from its own thread. Threads beyond the database's own (the CNI daemon's
            # keep theirs too) go beyond the pool's size without waiting for a connection.
            kwargs["pool_size"] = 2 * (_THREADS + 1)
            kwargs["max_overflow"] = -1
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=_THREADS, thread_name_prefix="capsa-db"
        )
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        # SQLite: each thread's kept connections (see _kept_connection), and all of them, to close.
        self._local = threading.local()
        self._kept: list[Connection] = []
        self._kept_lock = threading.Lock()
        # SQLite: the driver connection that the loop's writer last set up, its writes since the
        # last checkpoint, and the checkpoint under way.
        self._writer_here_set_up: object = None
        self._writes_here = 0
        self._checkpoint: asyncio.Future[None] | None = None
        # Where the wake-ups of writes on other threads (run_write_blocking) are published.
        self._loop: asyncio.AbstractEventLoop | None = None

    async def initialize(self) -> None:
        """Creates the tables on a new database; refuses a database of another schema version."""
        self._loop = asyncio.get_running_loop()
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

    async def run_read(self, work: Callable[[Connection], T], *, long: bool = False) -> T:
        """Runs ``work`` in a transaction that only reads (a consistent snapshot).

        On SQLite a short read runs right here on the event loop: WAL readers never wait for a
        writer, and the hand-off to a thread and back costs more than the read itself. A
        ``long`` one (a page of a thousand capsules) runs on a thread, so that the event loop
        goes on with other work between its rows.
        """
        if self.is_sqlite and not long:
            return self._transaction(work, False)
        return await self._in_thread(functools.partial(self._transaction, work, False))

    def read_rows_blocking(
        self, statement: DriverStatement, params: Mapping[str, Any]
    ) -> list[tuple[Any, ...]]:
        """The rows of one statement, on the calling thread, which it blocks: for threads of
        capsa's own that serve a caller waiting on them (the CNI daemon's), never the event
        loop. On SQLite it runs alone, without a transaction of its own: a single statement
        reads a consistent snapshot anyway, and BEGIN and COMMIT would be two more round trips
        through the driver."""
        if self.is_sqlite:
            return statement.rows(self._kept_connection(False), params)
        return self._transaction(functools.partial(statement.rows, params=params), False)

    def run_write_blocking(self, work: Callable[[Connection], T]) -> T:
        """:meth:`run_write` on the calling thread, which it blocks (never the event loop's: on
        SQLite it may wait for the loop's writer, and the driver begins and commits it straight).
        Its wake-ups are published on the event loop of :meth:`initialize` after the commit, or
        once the thread releases the wake-ups it holds (notify.hold_wakeups)."""
        if self._loop is None:
            raise RuntimeError("Database.initialize() has not run: no event loop to wake")
        result, wakeups = self._write_transaction(work, on_driver=self.is_sqlite)
        notify.call_soon_on(self._loop, self._written_elsewhere, wakeups)
        return result

    def _written_elsewhere(self, wakeups: list[notify.Wakeup]) -> None:
        """On the loop, after a blocking write: its wake-ups published, and on SQLite the
        write counted with the loop's, which checkpoint the log on a database thread."""
        self._published(wakeups)
        if self.is_sqlite:
            assert self._loop is not None
            self._written_here(self._loop)

    def _without_checkpoints(self, driver: sqlite3.Connection) -> None:
        """Turns SQLite's own checkpoint off for this thread's writer ``driver``, as for the
        loop's: it syncs the disk, which a caller waiting on the write would wait for."""
        if getattr(self._local, "writer_without_checkpoints", None) is not driver:
            driver.execute("PRAGMA wal_autocheckpoint=0")
            self._local.writer_without_checkpoints = driver

    async def run_write(self, work: Callable[[Connection], T]) -> T:
        """Runs ``work`` in a write transaction: committed if it returns, rolled back if it
        raises; on SQLite it holds the write lock from its first statement. The wake-ups it
        names, and notify.COMMITTED, are published once it has committed, as its caller resumes.

        On SQLite it runs right here on the event loop, unless another process holds the write
        lock: then on a thread, which waits for it. A write is a few statements under a lock
        that this process's writers take in turn; the hand-off to a thread and back, and the
        thread's wait for the GIL while the loop runs, made each write on the start path of a
        capsule 0.5-2 ms longer than the write itself.
        """
        release = await self._write_turn()
        loop = asyncio.get_running_loop()
        if self.is_sqlite:
            assert release is not None
            try:
                here = self._write_here(work)
            except BaseException:
                release()
                raise
            if not isinstance(here, _Busy):
                release()
                result, wakeups = here
                loop.call_soon(self._published, wakeups)
                self._written_here(loop)
                # As after a thread's write: the wake-ups are out when the caller resumes, and
                # what they wake runs after the caller's next step.
                await asyncio.sleep(0)
                return result

        def finished(future: asyncio.Future[tuple[T, list[notify.Wakeup]]]) -> None:
            if release is not None:
                release()
            if not future.cancelled() and future.exception() is None:
                # Scheduled now, they run before the caller resumes (a turn later still); one
                # turn later, the subscribers they wake resume after it.
                loop.call_soon(self._published, future.result()[1])

        result, _ = await self._in_thread(
            functools.partial(self._write_transaction, work), then=finished
        )
        return result

    def _published(self, wakeups: list[notify.Wakeup]) -> None:
        self.hub.publish_all(wakeups)
        self.hub.publish(notify.COMMITTED)

    def _write_here(self, work: Callable[[Connection], T]) -> tuple[T, list[notify.Wakeup]] | _Busy:
        """SQLite, on the event loop: ``work`` in a write transaction that does not wait for
        the write lock; _BUSY when another process holds it (nothing was done then)."""
        driver = _sqlite_driver(self._kept_connection(write=True, here=True))
        if driver is not self._writer_here_set_up:
            # A connection that the driver lost comes back with the engine's settings only.
            for pragma in _WRITER_HERE_PRAGMAS:
                driver.execute(pragma)
            self._writer_here_set_up = driver
        try:
            return self._write_transaction(work, here=True)
        except sqlite3.OperationalError as exc:
            # Only BEGIN IMMEDIATE can find the lock taken: once held, no statement waits. It
            # goes to the driver straight (_on_begin), so its error is the driver's own.
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY:
                return _BUSY
            raise

    def _written_here(self, loop: asyncio.AbstractEventLoop) -> None:
        """Counts a write on the loop (or a blocking one, see run_write_blocking); every
        _CHECKPOINT_EVERY of them, checkpoints the write-ahead log on a thread (those writers
        never do: it syncs the disk)."""
        self._writes_here += 1
        if self._writes_here < _CHECKPOINT_EVERY or self._checkpoint is not None:
            return
        self._writes_here = 0
        checkpoint = self._checkpoint = loop.run_in_executor(self._threads, self._checkpoint_wal)
        checkpoint.add_done_callback(self._checkpointed)

    def _checkpoint_wal(self) -> None:
        # PASSIVE: copies what no reader still needs, and never waits for a reader or a writer.
        driver = _sqlite_driver(self._kept_connection(write=False))
        driver.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _checkpointed(self, future: asyncio.Future[None]) -> None:
        self._checkpoint = None
        if not future.cancelled() and future.exception() is not None:
            # The log only grows until the next one; SQLite checkpoints it at its next open.
            log.warning("checkpointing the database's log failed", error=str(future.exception()))

    async def close(self) -> None:
        # Waits for a checkpoint under way too.
        await asyncio.get_running_loop().run_in_executor(None, self._threads.shutdown)
        with self._kept_lock:
            kept, self._kept = self._kept, []
        for conn in kept:
            conn.close()
        self.engine.dispose()

    def _transaction(
        self, work: Callable[[Connection], T], write: bool, *, here: bool = False
    ) -> T:
        """``work`` in one transaction, committed unless it raises."""
        if not self.is_sqlite:
            with self.engine.connect() as conn, conn.begin():
                return work(conn)
        # A kept connection that the driver lost reconnects at its next use (SQLAlchemy's own).
        conn = self._kept_connection(write, here=here)
        with conn.begin():
            return work(conn)

    def _kept_connection(self, write: bool, *, here: bool = False) -> Connection:
        """This thread's connection for reads or for writes (whose transactions begin with
        BEGIN IMMEDIATE), made at its first use; ``here``: the event loop's writer, which
        _write_here sets up not to wait."""
        kept: dict[tuple[bool, bool], Connection] | None = getattr(self._local, "connections", None)
        if kept is None:
            kept = self._local.connections = {}
        conn = kept.get((write, here))
        if conn is None:
            conn = self.engine.connect()
            if write:
                conn.execution_options(**{_BEGIN_OPTION: "BEGIN IMMEDIATE"})
            kept[(write, here)] = conn
            with self._kept_lock:
                self._kept.append(conn)
        return conn

    def _driver_write_transaction(self, work: Callable[[Connection], T]) -> T:
        """SQLite, for :meth:`run_write_blocking`: ``work`` in a write transaction that the
        driver begins (BEGIN IMMEDIATE) and commits straight. SQLAlchemy's begin and commit take
        about 0.1 ms when the CPU's caches are cold, as on a CNI call's path between two plugin
        execs, where the write's statements take 0.1-0.2 ms. Work that runs a statement through
        SQLAlchemy joins the transaction (its begin sends no second BEGIN), and SQLAlchemy then
        commits or rolls it back."""
        conn = self._kept_connection(write=True)
        driver = _sqlite_driver(conn)
        self._without_checkpoints(driver)
        driver.execute("BEGIN IMMEDIATE")
        conn.info[_DRIVER_TRANSACTION] = True
        try:
            result = work(conn)
            if conn.in_transaction():
                conn.commit()
            else:
                driver.commit()
        except BaseException:
            # A connection lost meanwhile took its transaction with it.
            if not conn.invalidated:
                if conn.in_transaction():
                    conn.rollback()
                else:
                    driver.rollback()
            raise
        finally:
            conn.info.pop(_DRIVER_TRANSACTION, None)
        return result

    def _write_transaction(
        self, work: Callable[[Connection], T], *, here: bool = False, on_driver: bool = False
    ) -> tuple[T, list[notify.Wakeup]]:
        """``work`` in one write transaction, with the wake-ups it named (written into the
        database too with shared wake-ups); ``on_driver``: begun and committed by SQLite's
        driver straight (_driver_write_transaction)."""

        def with_wakeups(conn: Connection) -> tuple[T, list[notify.Wakeup]]:
            notify.collect(conn)
            try:
                result = work(conn)
            except BaseException:
                # A failed transaction's wake-ups are dropped; a lost connection took them
                # with it (reaching for them would raise over the failure).
                if not conn.invalidated:
                    notify.collected(conn)
                raise
            wakeups = notify.collected(conn)
            if wakeups and self.shared_wakeups:
                wakefeed.record(conn, wakeups, self.origin)
            return result, wakeups

        if on_driver:
            return self._driver_write_transaction(with_wakeups)
        return self._transaction(with_wakeups, True, here=here)

    async def _write_turn(self) -> Callable[[], None] | None:
        """Waits for this process's turn to write; returns what ends the turn."""
        if self._write_lock is None:
            return None
        await self._write_lock.acquire()
        return self._write_lock.release

    async def _in_thread(
        self, call: Callable[[], T], then: Callable[[asyncio.Future[T]], None] | None = None
    ) -> T:
        """Runs ``call`` on a database thread, then ``then`` with its outcome on the event loop.
        A cancelled caller stops waiting; the call runs to its end all the same (see the
        module's doc)."""
        future = asyncio.get_running_loop().run_in_executor(self._threads, call)
        future.add_done_callback(functools.partial(_finished, then))
        return await asyncio.shield(future)


def dialect_insert(conn: Connection, table: Table) -> sqlite.Insert | postgresql.Insert:
    """An INSERT that can say what to do on a conflict, in the database's own dialect."""
    if conn.dialect.name == "postgresql":
        # Imported only where it is used: the dialect costs 2 MB of every SQLite capsa.
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table)
    return sqlite.insert(table)


def _finished(
    then: Callable[[asyncio.Future[Any]], None] | None, future: asyncio.Future[Any]
) -> None:
    if then is not None:
        then(future)
    # Marks a failure as seen: a caller that was cancelled no longer wants it, and one that
    # waits gets it from its own await.
    if not future.cancelled():
        future.exception()


@dataclass(frozen=True)
class _DriverSql:
    """A statement compiled for SQLite: its SQL, and each of its positional parameters: a
    statement's literal, already processed (name None), or a named parameter with its type's
    bind processor."""

    sql: str
    parameters: tuple[tuple[str | None, Any, Callable[[Any], Any] | None], ...]

    def bind(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(
            value if name is None else (process(params[name]) if process else params[name])
            for name, value, process in self.parameters
        )


class DriverStatement:
    """A Core statement that SQLite runs straight through the DB-API cursor.

    SQLAlchemy's execution of a statement (its context, the parameters' processing, the result's
    wrapping) takes 0.2-0.3 ms when the CPU's caches are cold, as on a CNI ADD's path between
    two plugin execs: more than SQLite takes to run it. The statement is compiled once, its
    parameters go through their types' bind processors, and its rows come back as plain tuples,
    so it may only return columns whose values need no conversion (checked when compiled). On
    other databases it runs through SQLAlchemy like any statement.
    """

    def __init__(self, statement: Select[Any] | Update) -> None:
        self.statement = statement
        self._sqlite: _DriverSql | None = None

    def rows(self, conn: Connection, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Runs it with ``params`` in ``conn``'s transaction (or alone, outside any); its rows."""
        if conn.dialect.name != "sqlite":
            result = conn.execute(self.statement, dict(params))
            return [tuple(row) for row in result] if result.returns_rows else []
        compiled = self._compiled(conn.dialect)
        return _sqlite_driver(conn).execute(compiled.sql, compiled.bind(params)).fetchall()

    def run_many(self, conn: Connection, params: Sequence[Mapping[str, Any]]) -> None:
        """Runs it once per parameter set, in ``conn``'s transaction."""
        if conn.dialect.name != "sqlite":
            conn.execute(self.statement, [dict(p) for p in params])
            return
        compiled = self._compiled(conn.dialect)
        _sqlite_driver(conn).executemany(compiled.sql, [compiled.bind(p) for p in params])

    def _compiled(self, dialect: Dialect) -> _DriverSql:
        if self._sqlite is None:
            self._sqlite = _compile_for_driver(self.statement, dialect)
        return self._sqlite


def _compile_for_driver(statement: Select[Any] | Update, dialect: Dialect) -> _DriverSql:
    compiled = statement.compile(dialect=dialect)
    assert isinstance(compiled, SQLCompiler)
    for column in getattr(statement, "exported_columns", ()):
        if column.type.dialect_impl(dialect).result_processor(dialect, None) is not None:
            raise TypeError(
                f"{column} needs SQLAlchemy to convert what SQLite returns: run the statement "
                "with Connection.execute"
            )
    parameters: list[tuple[str | None, Any, Callable[[Any], Any] | None]] = []
    for name in compiled.positiontup or ():
        bind = compiled.binds[name]
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        # A bind without a value (required) is the caller's; one with a value is a literal.
        if bind.required:
            parameters.append((name, None, process))
        else:
            parameters.append((None, process(bind.value) if process else bind.value, None))
    return _DriverSql(str(compiled), tuple(parameters))


def _sqlite_driver(conn: Connection) -> sqlite3.Connection:
    """The sqlite3 connection under ``conn`` (reconnected if the driver lost it)."""
    driver = conn.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    return driver


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
        if conn.info.get(_DRIVER_TRANSACTION):
            # A statement of SQLAlchemy's inside a transaction that the driver began.
            return
        # On the driver itself: SQLAlchemy's execution path would take longer than SQLite does.
        _sqlite_driver(conn).execute(conn.get_execution_options().get(_BEGIN_OPTION, "BEGIN"))
