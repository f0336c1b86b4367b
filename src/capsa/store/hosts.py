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
        async with self._db.write() as conn:
            result = await conn.execute(update(h_t).where(h_t.c.name == name).values(**values))
            if not result.rowcount:
                await conn.execute(
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
            row = (await conn.execute(select(h_t).where(h_t.c.name == name))).one()
        # A new or returning host may fit capsules that are waiting.
        self._hub.publish(notify.SCHEDULER)
        return _host(row)

    async def set_disabled(self, name: str, disabled: bool) -> None:
        """A disabled host gets no new capsules; those it runs stay."""

        def work(conn: Connection) -> None:
            conn.execute(
                update(h_t).where(h_t.c.name == name).values(disabled=disabled, updated_at=utcnow())
            )

        await self._db.run_write(work)
        if not disabled:
            self._hub.publish(notify.SCHEDULER)

    async def set_tunnel_ip(self, name: str, tunnel_ip: str | None) -> None:
        """Where other hosts send this host's share of the networks' overlay (None: nowhere)."""

        def work(conn: Connection) -> None:
            conn.execute(update(h_t).where(h_t.c.name == name).values(tunnel_ip=tunnel_ip))

        await self._db.run_write(work)
        self._hub.publish(notify.NETWORK)

    async def heartbeat(self, name: str) -> None:
        now = utcnow()
        async with self._db.write() as conn:
            await conn.execute(
                update(h_t).where(h_t.c.name == name).values(heartbeat_at=now, updated_at=now)
            )

    async def get(self, name: str) -> Host | None:
        async with self._db.read() as conn:
            row = (await conn.execute(select(h_t).where(h_t.c.name == name))).first()
        return _host(row) if row else None

    async def all(self, alive_since: datetime | None = None) -> list[Host]:
        """Hosts, optionally only those whose agent reported since ``alive_since``."""
        query = select(h_t).order_by(h_t.c.name)
        if alive_since is not None:
            query = query.where(h_t.c.heartbeat_at >= alive_since)
        async with self._db.read() as conn:
            return [_host(r) for r in await conn.execute(query)]

    async def claim(self, capsule_uuid: str, host: str, cpu_millis: int, memory_mb: int) -> bool:
        """Places a capsule on ``host`` if the host still has room, atomically.

        The resources and the placement are written in one transaction, and each only under a
        condition (room left; capsule still unplaced and wanted), so two schedulers can never
        overcommit a host or place one capsule twice. Returns False when either condition failed.
        """
        now = utcnow()
        try:
            async with self._db.write() as conn:
                taken = await conn.execute(
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
                if not taken.rowcount:
                    raise _PlacementLost
                placed = await conn.execute(
                    update(c_t)
                    .where(
                        c_t.c.uuid == capsule_uuid,
                        c_t.c.host.is_(None),
                        c_t.c.desired_state == DesiredState.RUNNING,
                    )
                    .values(host=host, task_state=TaskState.NETWORK_ATTACHING, updated_at=now)
                )
                if not placed.rowcount:
                    raise _PlacementLost
        except _PlacementLost:
            return False
        self._hub.publish(notify.host_topic(host))
        return True

    async def fail_placement(self, capsule_uuid: str, reason: str) -> bool:
        """Marks an unplaceable capsule as Error, unless it was placed or deleted meanwhile."""
        async with self._db.write() as conn:
            result = await conn.execute(
                update(c_t)
                .where(
                    c_t.c.uuid == capsule_uuid,
                    c_t.c.host.is_(None),
                    c_t.c.desired_state == DesiredState.RUNNING,
                )
                .values(
                    status=Status.ERROR, status_reason=reason, task_state=None, updated_at=utcnow()
                )
            )
        return bool(result.rowcount)


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
