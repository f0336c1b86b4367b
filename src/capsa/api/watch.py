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

Every waiting request of this process is held by one :class:`CapsuleWatch`. It reads the versions
of all the awaited capsules in one query after each write transaction that this process commits
(:data:`capsa.store.notify.COMMITTED`: the agent's status writes, the CNI daemon's port bindings)
and every ``recheck_interval`` seconds for the writes of other processes (agents of other hosts on
a shared database): one query per write, however many clients wait, which reads each awaited
capsule's status with its version.
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
        self._closed = False

    async def changed(
        self,
        capsule_uuid: str,
        version: str | None,
        timeout: float,
        into: frozenset[Status] | None = None,
    ) -> bool:
        """Whether the capsule's version stopped being ``version`` (None: any version will do)
        within ``timeout`` seconds, with a status among ``into`` if given, or it went; False too
        when the API stops meanwhile."""
        if self._closed:
            return False
        waiter = _Waiter(version, into, asyncio.get_running_loop().create_future())
        self._waiting.setdefault(capsule_uuid, []).append(waiter)
        self._follow()
        try:
            async with asyncio.timeout(timeout):
                return await waiter.woken
        except TimeoutError:
            return False
        finally:
            waiters = self._waiting.get(capsule_uuid, [])
            waiters.remove(waiter)
            if not waiters:
                self._waiting.pop(capsule_uuid, None)

    def close(self) -> None:
        """Answers every waiting request now ("not changed"), so that the API stops at once."""
        self._closed = True
        for waiters in self._waiting.values():
            for waiter in waiters:
                if not waiter.woken.done():
                    waiter.woken.set_result(False)
        if self._follower is not None:
            self._follower.cancel()
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    def _follow(self) -> None:
        if self._subscription is None:
            self._subscription = self._hub.subscribe(notify.COMMITTED)
        # A write may have committed since the new waiter read its version: look once more.
        self._subscription.nudge()
        if self._follower is None:
            self._follower = asyncio.create_task(self._follow_writes(self._subscription))

    async def _follow_writes(self, subscription: notify.Subscription) -> None:
        """Looks after every write and every recheck interval, while anyone waits."""
        try:
            while self._waiting:
                await subscription.wait(self._recheck)
                if self._waiting:
                    await self._look()
        finally:
            self._follower = None

    async def _look(self) -> None:
        try:
            states = await self._capsules.states_of(list(self._waiting))
        except Exception as exc:  # the database may be away; the next look tries again
            log.warning("cannot read the versions of awaited capsules", reason=str(exc))
            return
        for capsule_uuid, waiters in list(self._waiting.items()):
            state = states.get(capsule_uuid)
            for waiter in waiters:
                if not waiter.woken.done() and waiter.wakes_at(state):
                    waiter.woken.set_result(True)


@dataclass(frozen=True, eq=False)
class _Waiter:
    version: str | None
    into: frozenset[Status] | None
    woken: asyncio.Future[bool]

    def wakes_at(self, state: CapsuleState | None) -> bool:
        """Whether the capsule's current state (None: gone) answers this waiter."""
        if state is None:
            return True
        return state.version != self.version and (self.into is None or state.status in self.into)
