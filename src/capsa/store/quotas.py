"""Quota limits (per project and per quota class) and the atomic check at create.

A create checks the project's quota and inserts its rows in one write transaction
(:func:`enforce` runs inside it). On SQLite that transaction holds the write lock from its first
statement (BEGIN IMMEDIATE), so no other create can count or insert in between. On PostgreSQL,
where write transactions run side by side, :func:`enforce` first locks the project's row in
``quota_locks``: a second create of the same project waits there until the first commits, then
counts what the first inserted. Usage is always counted from the capsules themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Select, Table, bindparam, delete, func, select
from sqlalchemy.engine import Connection

from capsa.model.quota import (
    DEFAULT_CLASS,
    NO_LIMITS,
    QuotaExcess,
    QuotaLimits,
    QuotaResource,
    QuotaUsage,
    exceeded,
)
from capsa.store import schema
from capsa.store.db import Database, dialect_insert

q_t = schema.quotas
qc_t = schema.quota_classes
c_t = schema.capsules

# Run by every create: built once (building them cost more than running them).
_PROJECT_LIMITS = select(q_t.c.resource, q_t.c.hard_limit).where(
    q_t.c.project_id == bindparam("project")
)
_CLASS_LIMITS = select(qc_t.c.resource, qc_t.c.hard_limit).where(
    qc_t.c.class_name == bindparam("class_name")
)
_USAGE = select(
    func.count(),
    func.coalesce(func.sum(c_t.c.cpu_millis), 0),
    func.coalesce(func.sum(c_t.c.memory_mb), 0),
).where(c_t.c.project_id == bindparam("project"))


class OverQuota(Exception):
    def __init__(self, project_id: str, excesses: list[QuotaExcess]) -> None:
        super().__init__(
            f"project {project_id} is over quota for "
            + ", ".join(e.resource.value for e in excesses)
        )
        self.project_id = project_id
        self.excesses = excesses


class QuotaStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def project_limits(self, project_id: str, defaults: QuotaLimits) -> QuotaLimits:
        return await self._db.run_read(lambda conn: project_limits(conn, project_id, defaults))

    async def usage(self, project_id: str) -> QuotaUsage:
        return await self._db.run_read(lambda conn: usage(conn, project_id))

    async def class_limits(self, class_name: str, defaults: QuotaLimits) -> QuotaLimits:
        return await self._db.run_read(lambda conn: _class_limits(conn, class_name, defaults))

    async def set_project_limits(
        self, project_id: str, limits: Mapping[QuotaResource, int], defaults: QuotaLimits
    ) -> QuotaLimits:
        """Sets some of a project's limits; returns all of them as they now are."""

        def write(conn: Connection) -> QuotaLimits:
            _upsert(conn, q_t, {"project_id": project_id}, limits)
            return project_limits(conn, project_id, defaults)

        return await self._db.run_write(write)

    async def reset_project_limits(self, project_id: str) -> None:
        """The project's limits become the defaults again."""
        await self._db.run_write(
            lambda conn: conn.execute(delete(q_t).where(q_t.c.project_id == project_id))
        )

    async def set_class_limits(
        self, class_name: str, limits: Mapping[QuotaResource, int], defaults: QuotaLimits
    ) -> QuotaLimits:
        def write(conn: Connection) -> QuotaLimits:
            _upsert(conn, qc_t, {"class_name": class_name}, limits)
            return _class_limits(conn, class_name, defaults)

        return await self._db.run_write(write)


def enforce(conn: Connection, project_id: str, request: QuotaUsage, defaults: QuotaLimits) -> None:
    """Raises OverQuota unless the project can take ``request`` more; call it in the write
    transaction that then inserts what was requested."""
    _lock_project(conn, project_id)
    limits = project_limits(conn, project_id, defaults)
    if limits == NO_LIMITS:
        return  # nothing to add up the usage for
    excesses = exceeded(limits, usage(conn, project_id), request)
    if excesses:
        raise OverQuota(project_id, excesses)


def project_limits(conn: Connection, project_id: str, defaults: QuotaLimits) -> QuotaLimits:
    """The project's own limits, else the default class's, else ``defaults`` (as Zun does)."""
    own = _limit_rows(conn, _PROJECT_LIMITS, {"project": project_id})
    default_class = _limit_rows(conn, _CLASS_LIMITS, {"class_name": DEFAULT_CLASS})
    return _merge(defaults, default_class, own)


def usage(conn: Connection, project_id: str) -> QuotaUsage:
    count, cpu, memory = conn.execute(_USAGE, {"project": project_id}).one()
    # Capsules have no disk of their own yet, so they use none of the disk quota.
    return QuotaUsage(containers=int(count), cpu_millis=int(cpu), memory_mb=int(memory))


def _class_limits(conn: Connection, class_name: str, defaults: QuotaLimits) -> QuotaLimits:
    """A class's limits, ``defaults`` for what it does not set."""
    return _merge(defaults, _limit_rows(conn, _CLASS_LIMITS, {"class_name": class_name}))


def _limit_rows(conn: Connection, query: Select[Any], params: dict[str, str]) -> dict[str, int]:
    return {row.resource: row.hard_limit for row in conn.execute(query, params)}


def _merge(defaults: QuotaLimits, *layers: dict[str, int]) -> QuotaLimits:
    """``defaults`` overridden by each layer in turn."""
    values = defaults.as_dict()
    for layer in layers:
        values.update({k: v for k, v in layer.items() if k in values})
    return QuotaLimits(**values)


def _upsert(
    conn: Connection, table: Table, key: dict[str, str], limits: Mapping[QuotaResource, int]
) -> None:
    for resource, limit in limits.items():
        row = {**key, "resource": resource.value, "hard_limit": limit}
        conn.execute(
            dialect_insert(conn, table)
            .values(**row)
            .on_conflict_do_update(index_elements=[*key, "resource"], set_={"hard_limit": limit})
        )


def _lock_project(conn: Connection, project_id: str) -> None:
    if conn.dialect.name == "sqlite":
        return  # the transaction already holds the database's write lock
    conn.execute(
        dialect_insert(conn, schema.quota_locks)
        .values(project_id=project_id)
        .on_conflict_do_nothing()
    )
    conn.execute(
        select(schema.quota_locks.c.project_id)
        .where(schema.quota_locks.c.project_id == project_id)
        .with_for_update()
    )
