"""Hosts and the claims that capsules hold on them."""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Connection, Row

from capsa.model.capsule import DesiredState, Status, TaskState
from capsa.model.clock import utcnow
from capsa.model.host import Claim, ClaimOutcome, Host
from capsa.store import notify, schema
from capsa.store.db import Database

h_t = schema.hosts
c_t = schema.capsules


# A claim's statements, built once: a scheduling pass runs them thousands of times.
_TAKE_ROOM = (
    update(h_t)
    .where(
        h_t.c.name == bindparam("host"),
        h_t.c.disabled.is_(False),
        h_t.c.cpu_millis_used + bindparam("cpu") <= h_t.c.cpu_millis,
        h_t.c.memory_mb_used + bindparam("memory") <= h_t.c.memory_mb,
    )
    .values(
        cpu_millis_used=h_t.c.cpu_millis_used + bindparam("cpu"),
        memory_mb_used=h_t.c.memory_mb_used + bindparam("memory"),
        updated_at=bindparam("now"),
    )
)
# A claim's room back to its host: its capsule went, or never was placed. The scheduler's kept
# view of the hosts sees the room by the host's updated_at.
GIVE_BACK_ROOM = (
    update(h_t)
    .where(h_t.c.name == bindparam("host"))
    .values(
        cpu_millis_used=h_t.c.cpu_millis_used - bindparam("cpu"),
        memory_mb_used=h_t.c.memory_mb_used - bindparam("memory"),
        updated_at=bindparam("now"),
    )
)
_CHANGED_SINCE = select(h_t).where(h_t.c.updated_at >= bindparam("since"))
_PLACE = (
    update(c_t)
    .where(
        c_t.c.uuid == bindparam("capsule"),
        c_t.c.host.is_(None),
        # Wanted: running, or (a single container) created but not running.
        c_t.c.desired_state != DesiredState.DELETED,
    )
    .values(
        host=bindparam("host"), task_state=TaskState.NETWORK_ATTACHING, updated_at=bindparam("now")
    )
)


class HostStore:
    def __init__(self, db: Database) -> None:
        self._db = db

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
            # A new or returning host may fit capsules that are waiting.
            notify.wake(conn, notify.SCHEDULER)
            return conn.execute(select(h_t).where(h_t.c.name == name)).one()

        return _host(await self._db.run_write(upsert))

    async def set_disabled(self, name: str, disabled: bool) -> None:
        """A disabled host gets no new capsules; those it runs stay."""

        def work(conn: Connection) -> None:
            conn.execute(
                update(h_t).where(h_t.c.name == name).values(disabled=disabled, updated_at=utcnow())
            )
            if not disabled:
                notify.wake(conn, notify.SCHEDULER)

        await self._db.run_write(work)

    async def set_tunnel_ip(self, name: str, tunnel_ip: str | None) -> None:
        """Where other hosts send this host's share of the networks' overlay (None: nowhere)."""

        def work(conn: Connection) -> None:
            conn.execute(update(h_t).where(h_t.c.name == name).values(tunnel_ip=tunnel_ip))
            notify.wake(conn, notify.NETWORK)

        await self._db.run_write(work)

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
        return await self._db.run_read(
            lambda conn: [_host(r) for r in conn.execute(query)], long=True
        )

    async def changed_since(self, since: datetime) -> list[Host]:
        """Hosts whose record changed at or after ``since`` (room taken or given back, capacity,
        runtimes, disabled, a heartbeat): what a view of the hosts kept since then lacks."""
        params = {"since": since}
        return await self._db.run_read(
            lambda conn: [_host(r) for r in conn.execute(_CHANGED_SINCE, params)]
        )

    async def claim(self, capsule_uuid: str, host: str, cpu_millis: int, memory_mb: int) -> bool:
        """Places one capsule on ``host`` if the host still has room; see :meth:`claim_many`."""
        outcomes = await self.claim_many([Claim(capsule_uuid, host, cpu_millis, memory_mb)])
        return outcomes[0] is ClaimOutcome.PLACED

    async def claim_many(self, claims: Sequence[Claim]) -> list[ClaimOutcome]:
        """Places capsules on hosts, each only if its host still has room and the capsule is
        still unplaced and wanted; one transaction for all, an outcome per claim.

        Each claim's two conditional updates are atomic together (a claim whose capsule is gone
        gives its host's room back in the same transaction), so schedulers running side by side
        can never overcommit a host or place one capsule twice.
        """
        now = utcnow()
        params = [
            {
                "capsule": c.capsule_uuid,
                "host": c.host,
                "cpu": c.cpu_millis,
                "memory": c.memory_mb,
                "now": now,
            }
            for c in claims
        ]

        def claim_all(conn: Connection) -> list[ClaimOutcome]:
            outcomes = []
            for claim, values in zip(claims, params, strict=True):
                if not conn.execute(_TAKE_ROOM, values).rowcount:
                    outcomes.append(ClaimOutcome.NO_ROOM)
                elif not conn.execute(_PLACE, values).rowcount:
                    conn.execute(GIVE_BACK_ROOM, values)
                    outcomes.append(ClaimOutcome.CAPSULE_GONE)
                else:
                    outcomes.append(ClaimOutcome.PLACED)
                    notify.wake(conn, notify.host_topic(claim.host), subject=claim.capsule_uuid)
            return outcomes

        return await self._db.run_write(claim_all)

    async def fail_placement(self, capsule_uuid: str, reason: str) -> bool:
        """Marks an unplaceable capsule as Error, unless it was placed or deleted meanwhile."""
        statement = (
            update(c_t)
            .where(
                c_t.c.uuid == capsule_uuid,
                c_t.c.host.is_(None),
                c_t.c.desired_state != DesiredState.DELETED,
            )
            .values(status=Status.ERROR, status_reason=reason, task_state=None, updated_at=utcnow())
        )

        def fail(conn: Connection) -> bool:
            if not conn.execute(statement).rowcount:
                return False
            notify.wake(conn, notify.CAPSULE_STATUS, subject=capsule_uuid)
            return True

        return await self._db.run_write(fail)


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
