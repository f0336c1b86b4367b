"""The database connection: transactions that are safe under concurrency, and the schema version.

SQLite needs care to be correct with several writers (tasks in one process, or several processes
sharing the file): a deferred transaction that reads and then writes fails with SQLITE_BUSY when
another writer committed in between, and the busy timeout does not help. Every write transaction
therefore starts with ``BEGIN IMMEDIATE``, which takes the write lock up front and waits for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from sqlalchemy import event, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from capsa.log import get_logger
from capsa.store import schema

log = get_logger(__name__)

_BEGIN_OPTION = "capsa_sqlite_begin"


class SchemaVersionError(RuntimeError):
    pass


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        # JSON documents (container specs, labels) are decoded for every row read: orjson is
        # several times faster than the json module at it.
        kwargs: dict[str, Any] = {
            "json_serializer": lambda value: orjson.dumps(value).decode(),
            "json_deserializer": orjson.loads,
        }
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30}
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine)

    async def initialize(self) -> None:
        """Creates the tables on a new database; refuses a database of another schema version."""
        async with self.write() as conn:
            await conn.run_sync(schema.metadata.create_all)
            row = (
                await conn.execute(
                    select(schema.meta.c.value).where(schema.meta.c.key == "schema_version")
                )
            ).first()
            if row is None:
                await conn.execute(
                    schema.meta.insert().values(
                        key="schema_version", value=str(schema.SCHEMA_VERSION)
                    )
                )
            elif int(row.value) != schema.SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"the database at {self.url} has schema version {row.value}, this capsa "
                    f"uses {schema.SCHEMA_VERSION}; upgrade capsa or use another database"
                )

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that only reads: a consistent snapshot."""
        async with self.engine.connect() as conn, conn.begin():
            yield conn

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that writes; on SQLite it holds the write lock from its first statement."""
        async with self.engine.connect() as conn:
            if self.is_sqlite:
                conn = await conn.execution_options(**{_BEGIN_OPTION: "BEGIN IMMEDIATE"})
            async with conn.begin():
                yield conn

    async def close(self) -> None:
        await self.engine.dispose()


def _configure_sqlite(engine: AsyncEngine) -> None:
    # pysqlite's own transaction handling would defer BEGIN; capsa emits BEGIN itself instead.
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get(_BEGIN_OPTION, "BEGIN"))
