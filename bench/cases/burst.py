"""Case 2: a burst of capsules created at once, wall time until the API shows all of them Running,
against as many raw CRI pods made at once on the same containerd."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from bench.api_client import GONE, RUNNING, ApiClient
from bench.cases.start import anchored, remove_reference_logs
from bench.host import token
from bench.instance import CapsaUp
from bench.reference import capsule_template
from bench.report import CaseResult, Target, compared
from bench.suite import Session, cpu_medians, interleave, metered

T = TypeVar("T")

BURST_TARGET = Target("ratio", "<=", 1.2, "ratio <= 1.2")
_TIMEOUT = 300.0


def run(session: Session) -> CaseResult:
    plan = session.plan
    paired = session.paired()
    size = plan.burst_size
    result = CaseResult(
        "burst",
        parameters={
            "size": size,
            "rounds": plan.burst_rounds,
            "warmup": plan.warmup,
        },
    )
    with paired.capsa.client() as api, anchored(session, paired, api):

        def capsa_round() -> dict[str, float]:
            began, uuids, finished = start_at_once(paired.capsa, size)
            for uuid in uuids:
                api.delete_capsule(uuid)
            for uuid in uuids:
                api.wait_until(uuid, GONE, _TIMEOUT)
            return {"burst": finished - began}

        def reference_round() -> dict[str, float]:
            began = time.perf_counter()
            pods = session.run(_gather(*(paired.reference.run() for _ in range(size))))
            finished = time.perf_counter()
            session.run(_gather(*(paired.reference.teardown(pod) for pod in pods)))
            remove_reference_logs(paired)
            return {"burst": finished - began}

        samples = interleave(
            {
                "capsa": metered(capsa_round, paired.processes(with_capsa=True)),
                "reference": metered(reference_round, paired.processes(with_capsa=False)),
            },
            plan.burst_rounds,
            plan.warmup,
        )
    result.samples = samples
    # Both sides' rounds include their teardown.
    result.details["cpu_ms_per_round"] = cpu_medians(samples)
    result.rows = [
        compared(
            "burst",
            f"{size} capsules at once: all Running",
            samples,
            ("capsa.burst", "reference.burst"),
            BURST_TARGET,
        )
    ]
    result.notes = [
        f"capsa: {size} POSTs from {size} threads released together, each thread then "
        "waiting for its capsule to be Running (Prefer: wait, until-status), as the start "
        "case's client does.",
        f"reference: {size} RunPodSandbox -> CreateContainer -> StartContainer chains at once "
        "(asyncio.gather on one gRPC channel) on the same containerd.",
    ]
    return result


def start_at_once(capsa: CapsaUp, size: int) -> tuple[float, list[str], float]:
    """POSTs ``size`` capsules from as many threads at the same moment, each thread then waiting
    for its capsule to run, as its tenant would; returns when they were released, the capsules'
    uuids, and when the last one was seen Running (time.perf_counter() both)."""
    clients = [capsa.client() for _ in range(size)]
    release = threading.Barrier(size + 1)

    def start(api: ApiClient) -> tuple[str, float]:
        api.raw("GET", "/v1")  # connected before the burst
        release.wait()
        created = api.create_capsule(capsule_template(f"bench-burst-{token()}"))
        uuid = str(created.capsule["uuid"])
        return uuid, api.wait_until(uuid, RUNNING, _TIMEOUT, created)

    try:
        with ThreadPoolExecutor(size) as pool:
            futures = [pool.submit(start, api) for api in clients]
            release.wait()
            began = time.perf_counter()
            started = [f.result() for f in futures]
    finally:
        for api in clients:
            api.close()
    return began, [uuid for uuid, _ in started], max(seen for _, seen in started)


async def _gather(*coroutines: Coroutine[Any, Any, T]) -> list[T]:
    return list(await asyncio.gather(*coroutines))
