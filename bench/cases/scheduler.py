"""Case 5: capsa's real Scheduler and Store on SQLite placing many capsules on many hosts, each
placement an atomic claim: placements per second of one scheduling pass.

Hosts are registered and capsules stored through the store's own calls first (not timed); the
timed part is ``Scheduler.schedule_pending()``, which reads the waiting capsules and the live
hosts and claims a host for each capsule, one transaction per claim.
"""

from __future__ import annotations

import time
import uuid

from bench.report import CaseResult, Target, single
from bench.suite import Session
from capsa.model.capsule import Capsule, CapsuleSpec, Container, ContainerKind, ContainerSpec
from capsa.scheduler.service import Scheduler
from capsa.store import Store

RATE_TARGET = Target("value", ">=", 1000.0, ">= 1,000/s at 1,000 hosts")
# Room for ten of the capsules below on every host, whatever the counts.
_HOST_CPU_MILLIS = 64_000
_HOST_MEMORY_MB = 256_000


def run(session: Session) -> CaseResult:
    plan = session.plan
    directory = session.workspace.new_dir("scheduler")
    store = Store(f"sqlite:///{directory / 'capsa.db'}")
    result = CaseResult(
        "scheduler",
        parameters={"hosts": plan.scheduler_hosts, "placements": plan.scheduler_placements},
    )
    session.run(store.open())
    try:
        began = time.monotonic()
        session.run(_fill(store, plan.scheduler_hosts, plan.scheduler_placements))
        result.details["fill_seconds"] = round(time.monotonic() - began, 1)
        scheduler = Scheduler(store, resync_interval=3600.0, host_timeout=3600.0)
        began = time.perf_counter()
        placed = session.run(scheduler.schedule_pending())
        elapsed = time.perf_counter() - began
    finally:
        session.run(store.close())
    if placed != plan.scheduler_placements:
        raise RuntimeError(f"placed {placed} of {plan.scheduler_placements} capsules")
    result.samples["pass_seconds"] = [elapsed]
    result.rows = [
        single(
            "scheduler",
            f"placements with claims, {plan.scheduler_hosts} hosts",
            placed / elapsed,
            "/s",
            n=placed,
            target=RATE_TARGET,
        )
    ]
    result.notes = [
        f"One Scheduler.schedule_pending() pass over {plan.scheduler_placements} waiting "
        f"capsules and {plan.scheduler_hosts} hosts, SQLite in a file (WAL), in the benchmark's "
        f"own process; it took {elapsed:.2f} s.",
    ]
    return result


async def _fill(store: Store, hosts: int, capsules: int) -> None:
    for number in range(hosts):
        await store.hosts.register(
            f"bench-host-{number:04d}",
            f"http://127.0.0.1:{10000 + number}",
            _HOST_CPU_MILLIS,
            _HOST_MEMORY_MB,
            ("runc",),
        )
    spec = ContainerSpec(name="main", image="busybox", cpu_millis=100, memory_mb=64)
    for number in range(capsules):
        capsule_uuid = str(uuid.uuid4())
        capsule = Capsule(
            uuid=capsule_uuid,
            project_id="bench",
            user_id="bench",
            spec=CapsuleSpec(name=f"bench-sched-{number:05d}", containers=(spec,)),
        )
        capsule.containers = [
            Container(
                uuid=str(uuid.uuid4()),
                capsule_uuid=capsule_uuid,
                project_id="bench",
                user_id="bench",
                kind=ContainerKind.APP,
                position=0,
                spec=spec,
            )
        ]
        await store.capsules.create(capsule)
