"""Hosts and the claims that capsules hold on them."""

from __future__ import annotations

import uuid as uuidlib
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection, Row

from capsa.model.capsule import DesiredState, Status, TaskState
from capsa.model.clock import utcnow
from capsa.model.host import Host
from capsa.store import notify, schema
from capsa.store.db import Database

h_t = schema.hosts
c_t = schema.capsules


class _PlacementLost(Exception):
    """Rolls back a claim whose capsule was placed or deleted meanwhile."""


class HostStore:
    def __init__(self, db: Database, hub: notify.ChangeHub) -> None:
        self._db = db
        self._hub = hub

    async def register(
        self,
        name: str,
        agent_url: str,
        cpu_millis: int,
        memory_mb: int,
        runtimes: tuple[str, ...],
    ) -> Host:
        """Creates or refreshes this host's record; what claims hold is kept."""
        now = utcnow()
        values = {
            "agent_url": agent_url,
            "cpu_millis": cpu_millis,
            "memory_mb": memory_mb,
            "runtimes": list(runtimes),
            "heartbeat_at": now,
            "updated_at": now,
        }

        def upsert(conn: Connection) -> Row[Any]:
            result = conn.execute(update(h_t).where(h_t.c.name == name).values(**values))
            if not result.rowcount:
                conn.execute(
                    h_t.insert().values(
                        name=name,
                        uuid=str(uuidlib.uuid4()),
                        cpu_millis_used=0,
                        memory_mb_used=0,
                        disabled=False,
                        created_at=now,
                        **values,
                    )
                )
            return conn.execute(select(h_t).where(h_t.c.name == name)).one()

        row = await self._db.run_write(upsert)
        # A new or returning host may fit capsules that are waiting.
        self._hub.publish(notify.SCHEDULER)
        return _host(row)

    async def heartbeat(self, name: str) -> None:
        now = utcnow()
        statement = update(h_t).where(h_t.c.name == name).values(heartbeat_at=now, updated_at=now)
        await self._db.run_write(lambda conn: conn.execute(statement))

    async def get(self, name: str) -> Host | None:
        query = select(h_t).where(h_t.c.name == name)
        row = await self._db.run_read(lambda conn: conn.execute(query).first())
        return _host(row) if row else None

    async def all(self, alive_since: datetime | None = None) -> list[Host]:
        """Hosts, optionally only those whose agent reported since ``alive_since``."""
        query = select(h_t).order_by(h_t.c.name)
        if alive_since is not None:
            query = query.where(h_t.c.heartbeat_at >= alive_since)
        return await self._db.run_read(lambda conn: [_host(r) for r in conn.execute(query)])

    async def claim(self, capsule_uuid: str, host: str, cpu_millis: int, memory_mb: int) -> bool:
        """Places a capsule on ``host`` if the host still has room, atomically.

        The resources and the placement are written in one transaction, and each only under a
        condition (room left; capsule still unplaced and wanted), so two schedulers can never
        overcommit a host or place one capsule twice. Returns False when either condition failed.
        """
        now = utcnow()
        take = (
            update(h_t)
            .where(
                h_t.c.name == host,
                h_t.c.disabled.is_(False),
                h_t.c.cpu_millis_used + cpu_millis <= h_t.c.cpu_millis,
                h_t.c.memory_mb_used + memory_mb <= h_t.c.memory_mb,
            )
            .values(
                cpu_millis_used=h_t.c.cpu_millis_used + cpu_millis,
                memory_mb_used=h_t.c.memory_mb_used + memory_mb,
                updated_at=now,
            )
        )
        place = (
            update(c_t)
            .where(
                c_t.c.uuid == capsule_uuid,
                c_t.c.host.is_(None),
                c_t.c.desired_state == DesiredState.RUNNING,
            )
            .values(host=host, task_state=TaskState.NETWORK_ATTACHING, updated_at=now)
        )

        def claim(conn: Connection) -> None:
            if not conn.execute(take).rowcount or not conn.execute(place).rowcount:
                raise _PlacementLost

        try:
            await self._db.run_write(claim)
        except _PlacementLost:
            return False
        self._hub.publish(notify.host_topic(host))
        return True

    async def fail_placement(self, capsule_uuid: str, reason: str) -> bool:
        """Marks an unplaceable capsule as Error, unless it was placed or deleted meanwhile."""
        statement = (
            update(c_t)
            .where(
                c_t.c.uuid == capsule_uuid,
                c_t.c.host.is_(None),
                c_t.c.desired_state == DesiredState.RUNNING,
            )
            .values(status=Status.ERROR, status_reason=reason, task_state=None, updated_at=utcnow())
        )
        return await self._db.run_write(lambda conn: bool(conn.execute(statement).rowcount))


def _host(row: Row[Any]) -> Host:
    return Host(
        name=row.name,
        uuid=row.uuid,
        agent_url=row.agent_url,
        cpu_millis=row.cpu_millis,
        memory_mb=row.memory_mb,
        cpu_millis_used=row.cpu_millis_used,
        memory_mb_used=row.memory_mb_used,
        runtimes=tuple(row.runtimes),
        disabled=row.disabled,
        heartbeat_at=row.heartbeat_at,
    )
