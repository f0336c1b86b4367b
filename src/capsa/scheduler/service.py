"""The scheduler: places each waiting capsule on a host with an atomic claim.

Level-triggered: every pass reads the capsules that wait for a host and the hosts that are alive;
a wake-up from the store starts a pass at once, the resync interval starts one anyway. A pass
chooses hosts in memory (:class:`HostChooser`) and claims them in batches, one transaction each.
A claim that loses a race (another scheduler took the room, or the capsule was deleted) gives its
room back in the pass's view; when the room was the reason, the next pass starts at once with
fresh hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import TYPE_CHECKING

from capsa.log import get_logger
from capsa.model.clock import utcnow
from capsa.model.host import Claim, ClaimOutcome, PlacementRequest
from capsa.scheduler.placement import HostChooser, explain_no_fit
from capsa.store import notify

if TYPE_CHECKING:
    from capsa.store import Store

log = get_logger(__name__)

# Claims per write transaction: enough to amortise the transaction, short enough that agents'
# writes do not wait long behind a big pass.
_CLAIMS_PER_TRANSACTION = 100


class Scheduler:
    def __init__(self, store: Store, resync_interval: float, host_timeout: float) -> None:
        self._store = store
        self._resync_interval = resync_interval
        self._host_timeout = host_timeout
        self._task: asyncio.Task[None] | None = None
        # Set by a pass whose claims found less room than it thought: the next pass is due now.
        self._view_is_stale = False

    async def start(self) -> None:
        wakeups = self._store.hub.subscribe(notify.SCHEDULER)
        self._task = asyncio.create_task(self._run(wakeups), name="scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, wakeups: notify.Subscription) -> None:
        try:
            while True:
                try:
                    await self.schedule_pending()
                except Exception:
                    log.exception("scheduling pass failed; retrying at the next wake-up")
                if not self._view_is_stale:
                    await wakeups.wait(self._resync_interval)
        finally:
            wakeups.close()

    async def schedule_pending(self) -> int:
        """One pass over the waiting capsules; returns how many were placed."""
        self._view_is_stale = False
        pending = await self._store.capsules.pending_placements()
        if not pending:
            return 0
        alive_since = utcnow() - timedelta(seconds=self._host_timeout)
        chooser = HostChooser(await self._store.hosts.all(alive_since=alive_since))
        placed = 0
        batch: list[PlacementRequest] = []
        hosts: list[str] = []
        for request in pending:
            host = chooser.take(request)
            if host is None and batch:
                # Room that a lost claim of the batch held may be this capsule's.
                placed += await self._claim(batch, hosts, chooser)
                batch, hosts = [], []
                host = chooser.take(request)
            if host is None:
                await self._fail(request, chooser)
                continue
            batch.append(request)
            hosts.append(host.name)
            if len(batch) == _CLAIMS_PER_TRANSACTION:
                placed += await self._claim(batch, hosts, chooser)
                batch, hosts = [], []
        if batch:
            placed += await self._claim(batch, hosts, chooser)
        return placed

    async def _claim(
        self, requests: list[PlacementRequest], hosts: list[str], chooser: HostChooser
    ) -> int:
        claims = [
            Claim(r.capsule_uuid, host, r.cpu_millis, r.memory_mb)
            for r, host in zip(requests, hosts, strict=True)
        ]
        outcomes = await self._store.hosts.claim_many(claims)
        placed = 0
        for request, host, outcome in zip(requests, hosts, outcomes, strict=True):
            if outcome is ClaimOutcome.PLACED:
                placed += 1
                log.info("capsule placed", capsule=request.capsule_uuid, host=host)
                continue
            chooser.give_back(host, request)
            if outcome is ClaimOutcome.NO_ROOM:
                # Someone else took room on this host: this pass's view of it is wrong.
                self._view_is_stale = True
        return placed

    async def _fail(self, request: PlacementRequest, chooser: HostChooser) -> None:
        reason = explain_no_fit(list(chooser.hosts.values()), request)
        if await self._store.hosts.fail_placement(request.capsule_uuid, reason):
            log.warning("capsule not placed", capsule=request.capsule_uuid, reason=reason)
