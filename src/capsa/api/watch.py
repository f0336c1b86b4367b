"""Clients that wait for a capsule to change instead of polling it.

A client that waits for its capsule to run, or to be gone (a tenant's script, ``capsa capsule
create --wait``), would poll it: each poll costs the API a request, and the client sees a change
only at its next poll. Instead, it sends the ETag of what it last saw (``If-None-Match``) and how
long it is willing to wait (``Prefer: wait=N``, RFC 7240); the API answers as soon as the capsule's
version differs from that one (200, or 404 once it is gone), or 304 Not Modified when the wait
ends. A client that waits for its capsule to reach a status (Running, or Error) says so
(``Prefer: until-status=Running|Error``), and its wait ends only at a change into one of those
statuses, or at the capsule's deletion: one answer instead of one per step of the start, each a
load and an encoding of the capsule for a client that would only ask again.

Every waiting request of this process is held by one :class:`CapsuleWatch`. It reads the states
(version and status) of awaited capsules in one query when a write of this process may have
changed them, and every ``recheck_interval`` seconds for the writes of other processes (agents of
other hosts on a shared database): a client waiting for any change is looked at after each write
transaction this process commits (:data:`capsa.store.notify.COMMITTED`: the agent's steps, the
CNI daemon's port bindings), a client waiting for a status only after a write that changed its
capsule's status or removed it (:data:`capsa.store.notify.CAPSULE_STATUS`, which names the
capsule, and which the shared wake-up feed brings from other processes too). A capsule's start
makes several writes and one status change (Running): one look instead of one per write.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from capsa.log import get_logger
from capsa.model.capsule import Status
from capsa.store import notify
from capsa.store.capsules import CapsuleState, CapsuleStore

log = get_logger(__name__)


class CapsuleWatch:
    def __init__(
        self, capsules: CapsuleStore, hub: notify.ChangeHub, recheck_interval: float
    ) -> None:
        self._capsules = capsules
        self._hub = hub
        self._recheck = recheck_interval
        # Per awaited capsule: the version each waiter saw, the statuses it waits for (None: any
        # change), and what wakes the waiter.
        self._waiting: dict[str, list[_Waiter]] = {}
        self._subscription: notify.Subscription | None = None
        self._follower: asyncio.Task[None] | None = None
        # Capsules of new waiters, to look at in the next look whatever was written.
        self._fresh: set[str] = set()
        self._closed = False

    def mark(self) -> int:
        """Notes the writes seen so far: a caller that reads a capsule's state after this, then
        waits with ``since=`` the mark, misses no write that came in between."""
        return self._hub.published

    async def changed(
        self,
        capsule_uuid: str,
        version: str | None,
        timeout: float,
        into: frozenset[Status] | None = None,
        since: int | None = None,
    ) -> CapsuleState | None:
        """Waits until the capsule's version is no longer ``version`` (None: any version will
        do), with a status among ``into`` if given, for up to ``timeout`` seconds; returns that
        state. None when the wait ended otherwise: the capsule went, the timeout, the API
        stopping.

        ``since`` is the :meth:`mark` taken before the caller read ``version``: the capsule is
        read once more if a write came since (always, without a mark)."""
        if self._closed:
            return None
        waiter = _Waiter(version, into, asyncio.get_running_loop().create_future())
        self._waiting.setdefault(capsule_uuid, []).append(waiter)
        self._follow(capsule_uuid, fresh=since is None or since != self._hub.published)
        try:
            async with asyncio.timeout(timeout):
                return await waiter.woken
        except TimeoutError:
            return None
        finally:
            waiters = self._waiting.get(capsule_uuid, [])
            waiters.remove(waiter)
            if not waiters:
                self._waiting.pop(capsule_uuid, None)

    def close(self) -> None:
        """Answers every waiting request now (None: not changed), so that the API stops at
        once."""
        self._closed = True
        for waiters in self._waiting.values():
            for waiter in waiters:
                if not waiter.woken.done():
                    waiter.woken.set_result(None)
        if self._follower is not None:
            self._follower.cancel()
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    def _follow(self, capsule_uuid: str, *, fresh: bool) -> None:
        if self._subscription is None:
            self._subscription = self._hub.subscribe(notify.COMMITTED, notify.CAPSULE_STATUS)
        if fresh:
            # A write may have committed since the new waiter read its version: look once more.
            self._fresh.add(capsule_uuid)
            self._subscription.nudge()
        if self._follower is None:
            self._follower = asyncio.create_task(self._follow_writes(self._subscription))

    async def _follow_writes(self, subscription: notify.Subscription) -> None:
        """Looks after the writes that may answer a waiter, and every recheck interval, while
        anyone waits."""
        try:
            while self._waiting:
                woken = await subscription.wait(self._recheck)
                # COMMITTED names nothing: after any commit, its subjects are None.
                committed = subscription.take_subjects(notify.COMMITTED) is None
                statuses = subscription.take_subjects(notify.CAPSULE_STATUS)
                fresh, self._fresh = self._fresh, set()
                if not woken:
                    await self._look(list(self._waiting))
                    continue
                await self._look(
                    [
                        capsule_uuid
                        for capsule_uuid, waiters in self._waiting.items()
                        if capsule_uuid in fresh
                        or any(
                            committed
                            if waiter.into is None
                            else statuses is None or capsule_uuid in statuses
                            for waiter in waiters
                        )
                    ]
                )
        finally:
            # Unsubscribed while no one waits: the subjects of status changes would pile up.
            # A waiter that comes later is looked at once, if a write came since its mark.
            self._follower = None
            subscription.close()
            if self._subscription is subscription:
                self._subscription = None

    async def _look(self, capsule_uuids: list[str]) -> None:
        if not capsule_uuids:
            return
        try:
            states = await self._capsules.states_of(capsule_uuids)
        except Exception as exc:  # the database may be away; the next look tries again
            log.warning("cannot read the versions of awaited capsules", reason=str(exc))
            return
        for capsule_uuid in capsule_uuids:
            state = states.get(capsule_uuid)
            for waiter in self._waiting.get(capsule_uuid, ()):
                if not waiter.woken.done() and waiter.wakes_at(state):
                    waiter.woken.set_result(state)


@dataclass(frozen=True, eq=False)
class _Waiter:
    version: str | None
    into: frozenset[Status] | None
    woken: asyncio.Future[CapsuleState | None]

    def wakes_at(self, state: CapsuleState | None) -> bool:
        """Whether the capsule's current state (None: gone) answers this waiter."""
        if state is None:
            return True
        return state.version != self.version and (self.into is None or state.status in self.into)
