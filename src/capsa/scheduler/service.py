"""The scheduler: places each waiting capsule on a host with an atomic claim.

Level-triggered, and cheap on a capsule's start path. A *full* pass reads every capsule that
waits for a host and every live host: the first pass, one at least every resync interval, one
after a wake-up that names nothing (a host registered or was enabled), and one at once after a
pass that found its view wrong. A wake-up that names capsules (a new capsule) starts a pass over
those alone, on the view of the hosts that the last pass left, caught up with the host records
changed since (room taken or given back, capacity, a heartbeat): a handful of rows instead of every
host. Such a pass fails no capsule: one that finds no host is left to a full pass, at once.

A pass chooses hosts in memory (:class:`HostChooser`) and claims them in batches, one transaction
each. A claim that loses a race (another scheduler took the room, or the capsule was deleted)
gives its room back in the pass's view; when the room was the reason, the view was wrong (a change
the catch-up missed: another host's clock, a write still waiting for its turn when the view caught
up), and a full pass starts at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from capsa.log import get_logger
from capsa.model.clock import utcnow
from capsa.model.host import Claim, ClaimOutcome, Host, PlacementRequest
from capsa.scheduler.placement import HostChooser, explain_no_fit
from capsa.store import notify

if TYPE_CHECKING:
    from capsa.store import Store

log = get_logger(__name__)

# Claims per write transaction: enough to amortise the transaction, short enough that agents'
# writes do not wait long behind a big pass.
_CLAIMS_PER_TRANSACTION = 100
# How far before its last catch-up the view looks for changed host records: a record's time is
# taken before its transaction waits for its turn to write.
_CATCH_UP_OVERLAP = timedelta(seconds=2)


class Scheduler:
    def __init__(self, store: Store, resync_interval: float, host_timeout: float) -> None:
        self._store = store
        self._resync_interval = resync_interval
        self._host_timeout = host_timeout
        self._task: asyncio.Task[None] | None = None
        # Set by a pass that found its view of the hosts wrong, or left capsules without a host
        # to a full pass: the next pass is a full one, due now.
        self._full_pass_now = False
        self._next_full_pass = 0.0  # time.monotonic()
        # The hosts as the last pass left them (its claims included), and when they were read.
        self._hosts: dict[str, Host] = {}
        self._hosts_read_at: datetime | None = None

    async def start(self) -> None:
        wakeups = self._store.hub.subscribe(notify.SCHEDULER)
        self._task = asyncio.create_task(self._run(wakeups), name="scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, wakeups: notify.Subscription) -> None:
        failed = False
        try:
            while True:
                subjects = wakeups.take_subjects()
                # Due by the clock, not only after a quiet resync interval: wake-ups that keep
                # coming must not put the full pass off.
                if failed or self._full_pass_now or time.monotonic() >= self._next_full_pass:
                    subjects = None
                try:
                    await self.schedule_pending(subjects)
                    failed = False
                except Exception:
                    log.exception("scheduling pass failed; a full pass at the next wake-up")
                    failed = True
                if not self._full_pass_now:
                    await wakeups.wait(max(0.0, self._next_full_pass - time.monotonic()))
        finally:
            wakeups.close()

    async def schedule_pending(self, subjects: Collection[str] | None = None) -> int:
        """One pass: over every waiting capsule (``subjects`` None), or over those of
        ``subjects`` only; returns how many were placed."""
        full = subjects is None
        self._full_pass_now = False
        if full:
            self._next_full_pass = time.monotonic() + self._resync_interval
        elif not subjects:
            return 0
        pending = await self._store.capsules.pending_placements(subjects)
        if not pending:
            return 0
        chooser = HostChooser(await self._live_hosts(full))
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
                if full:
                    await self._fail(request, chooser)
                else:
                    # The kept view may lack room given back meanwhile: a full pass decides.
                    self._full_pass_now = True
                continue
            batch.append(request)
            hosts.append(host.name)
            if len(batch) == _CLAIMS_PER_TRANSACTION:
                placed += await self._claim(batch, hosts, chooser)
                batch, hosts = [], []
        if batch:
            placed += await self._claim(batch, hosts, chooser)
        self._hosts.update(chooser.hosts)
        return placed

    async def _live_hosts(self, read_all: bool) -> list[Host]:
        """The hosts whose agents report: all read again, or the kept view caught up with the
        host records changed since it was read (the first time, all are read)."""
        now = utcnow()
        alive_since = now - timedelta(seconds=self._host_timeout)
        if read_all or self._hosts_read_at is None:
            self._hosts = {h.name: h for h in await self._store.hosts.all(alive_since=alive_since)}
        else:
            since = self._hosts_read_at - _CATCH_UP_OVERLAP
            self._hosts.update((h.name, h) for h in await self._store.hosts.changed_since(since))
        self._hosts_read_at = now
        return [
            h
            for h in self._hosts.values()
            if h.heartbeat_at is not None and h.heartbeat_at >= alive_since
        ]

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
                self._full_pass_now = True
        return placed

    async def _fail(self, request: PlacementRequest, chooser: HostChooser) -> None:
        reason = explain_no_fit(list(chooser.hosts.values()), request)
        if await self._store.hosts.fail_placement(request.capsule_uuid, reason):
            log.warning("capsule not placed", capsule=request.capsule_uuid, reason=reason)
