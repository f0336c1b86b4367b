"""Wake-ups that cross processes: a table of change sequence numbers that each process follows.

Within one process, the wake-ups of a change go straight to its :class:`ChangeHub`. Processes
that share a database (the hosts of one cloud, each with its own agents and perhaps a scheduler
and an API) also need each other's: a capsule that another host's scheduler placed here, another
host's new port for this host's overlay forwarding entries and remote-group members. With the
feed on, each write transaction that names wake-ups also inserts them into ``wakeups`` (in the
same transaction: a row exists exactly when its change committed, and no process sees it before
the change), and a :class:`WakeupFollower` in each process reads the rows after the last one it
saw, every ``interval`` seconds (an indexed range read that finds nothing most of the time), and
publishes those of other processes to its own hub.

The principles of :mod:`capsa.store.notify` hold: a row carries a topic and at most a subject,
never state, and a lost wake-up (a follower that was stopped, or later than :data:`RETENTION`)
costs one resync. The followers delete rows older than :data:`RETENTION`.

On PostgreSQL, transactions can commit in another order than they drew their sequence numbers: a
row may appear after rows with larger numbers. A follower therefore reads again from the first
number it has not seen, for :data:`GAP_GRACE` seconds, before it gives up on it (a transaction
that rolled back leaves a number that never comes). SQLite's writers take turns: no gap there.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, delete, func, select
from sqlalchemy.engine import Connection

from capsa.log import get_logger
from capsa.model.clock import utcnow
from capsa.store import schema
from capsa.store.notify import Wakeup

if TYPE_CHECKING:
    from capsa.store.db import Database

log = get_logger(__name__)

w_t = schema.wakeups

# Rows older than this are deleted: a follower further behind loses them (one resync).
RETENTION = 60.0
# How long a follower waits for a number that is missing between numbers it has seen.
GAP_GRACE = 2.0
# How often each follower deletes old rows.
PRUNE_INTERVAL = 15.0

_NEWER = (
    select(w_t.c.seq, w_t.c.topic, w_t.c.subject, w_t.c.origin)
    .where(w_t.c.seq > bindparam("after"))
    .order_by(w_t.c.seq)
)
_LAST = select(func.max(w_t.c.seq))
_OLDER = delete(w_t).where(w_t.c.created_at < bindparam("before"))


def record(conn: Connection, wakeups: list[Wakeup], origin: str) -> None:
    """Writes the wake-ups of the transaction of ``conn`` for the other processes."""
    now = utcnow()
    conn.execute(
        w_t.insert(),
        [
            {"topic": w.topic, "subject": w.subject, "origin": origin, "created_at": now}
            for w in wakeups
        ],
    )


class WakeupFollower:
    """Publishes the wake-ups that other processes write to ``db``, in this process."""

    def __init__(
        self, db: Database, interval: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._db = db
        self._interval = interval
        self._clock = clock
        # Every number up to this one was seen or given up on.
        self._after = 0
        # Numbers above it seen already, and since when each missing one is awaited.
        self._seen: set[int] = set()
        self._missing: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Follows from the newest row on: what came before, the process's first pass sees."""
        self._after = await self._db.run_read(lambda conn: conn.execute(_LAST).scalar() or 0)
        self._task = asyncio.create_task(self._follow(), name="wakeup-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def follow_once(self) -> int:
        """Reads the new rows and publishes other processes' wake-ups; returns how many."""
        params = {"after": self._after}
        rows = await self._db.run_read(lambda conn: conn.execute(_NEWER, params).all())
        published = 0
        for seq, topic, subject, origin in rows:
            if seq in self._seen:
                continue
            self._seen.add(seq)
            self._missing.pop(seq, None)
            if origin != self._db.origin:
                self._db.hub.publish(topic, subject=subject)
                published += 1
        self._settle(self._clock())
        return published

    def _settle(self, now: float) -> None:
        """Moves past the numbers seen, and past those missing for longer than GAP_GRACE."""
        if not self._seen:
            return
        for seq in range(self._after + 1, max(self._seen)):
            if seq not in self._seen:
                self._missing.setdefault(seq, now)
        while True:
            following = self._after + 1
            if following in self._seen:
                self._seen.discard(following)
            elif now - self._missing.get(following, now) > GAP_GRACE:
                del self._missing[following]
            else:
                return
            self._after = following

    async def prune(self) -> None:
        params = {"before": utcnow() - timedelta(seconds=RETENTION)}
        await self._db.run_write(lambda conn: conn.execute(_OLDER, params))

    async def _follow(self) -> None:
        prune_at = time.monotonic()
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.follow_once()
                if time.monotonic() >= prune_at:
                    await self.prune()
                    prune_at = time.monotonic() + PRUNE_INTERVAL
            except Exception as exc:
                # The database is the truth and the resync its safety net: keep following.
                log.warning("cannot read other processes' wake-ups", error=str(exc))
