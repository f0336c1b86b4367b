"""The scheduler: places each waiting capsule on a host with an atomic claim.

Level-triggered: every pass reads the capsules that wait for a host and the hosts that are alive;
a wake-up from the store starts a pass at once, the resync interval starts one anyway. A claim that
loses a race (another scheduler took the room, or the capsule was deleted) just moves on; the host
view is refreshed on the next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING

from capsa.log import get_logger
from capsa.model.capsule import Capsule
from capsa.model.clock import utcnow
from capsa.model.host import Host
from capsa.scheduler.placement import Request, explain_no_fit, rank
from capsa.store import notify

if TYPE_CHECKING:
    from capsa.store import Store

log = get_logger(__name__)


class Scheduler:
    def __init__(self, store: Store, resync_interval: float, host_timeout: float) -> None:
        self._store = store
        self._resync_interval = resync_interval
        self._host_timeout = host_timeout
        self._task: asyncio.Task[None] | None = None

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
                await wakeups.wait(self._resync_interval)
        finally:
            wakeups.close()

    async def schedule_pending(self) -> int:
        """One pass over the waiting capsules; returns how many were placed."""
        capsules = await self._store.capsules.list_unscheduled()
        if not capsules:
            return 0
        alive_since = utcnow() - timedelta(seconds=self._host_timeout)
        hosts = {h.name: h for h in await self._store.hosts.all(alive_since=alive_since)}
        placed = 0
        for capsule in capsules:
            if await self.place(capsule, hosts):
                placed += 1
        return placed

    async def place(self, capsule: Capsule, hosts: dict[str, Host]) -> bool:
        """Claims the best host for ``capsule``; ``hosts`` is updated with what the claim took."""
        request = Request(capsule.spec.cpu_millis, capsule.spec.memory_mb, capsule.spec.runtime)
        for host in rank(hosts.values(), request):
            if await self._store.hosts.claim(
                capsule.uuid, host.name, request.cpu_millis, request.memory_mb
            ):
                hosts[host.name] = _with_claim(host, request)
                log.info("capsule placed", capsule=capsule.uuid, host=host.name)
                return True
        reason = explain_no_fit(list(hosts.values()), request)
        if await self._store.hosts.fail_placement(capsule.uuid, reason):
            log.warning("capsule not placed", capsule=capsule.uuid, reason=reason)
        return False


def _with_claim(host: Host, request: Request) -> Host:
    return replace(
        host,
        cpu_millis_used=host.cpu_millis_used + request.cpu_millis,
        memory_mb_used=host.memory_mb_used + request.memory_mb,
    )
