"""Case 2: a burst of capsules created at once, wall time until the API shows all of them Running,
against as many raw CRI pods made at once on the same containerd."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from bench.api_client import ApiClient, is_gone, is_running
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
            began, uuids = create_at_once(paired.capsa, size)
            finished = wait_all_running(paired.capsa, uuids)
            for uuid in uuids:
                api.delete_capsule(uuid)
            for uuid in uuids:
                api.wait_until(uuid, is_gone, _TIMEOUT)
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
            samples["capsa.burst"],
            samples["reference.burst"],
            BURST_TARGET,
        )
    ]
    result.notes = [
        f"capsa: {size} POSTs from {size} threads released together; each thread then follows "
        "its capsule (GET, each held by the API until the capsule changes) until it is Running, "
        "as a tenant's `capsa capsule create --wait` would.",
        f"reference: {size} RunPodSandbox -> CreateContainer -> StartContainer chains at once "
        "(asyncio.gather on one gRPC channel) on the same containerd.",
    ]
    return result


def create_at_once(capsa: CapsaUp, size: int) -> tuple[float, list[str]]:
    """POSTs ``size`` capsules from as many threads at the same moment; returns when they were
    released (time.perf_counter()) and the capsules' uuids."""
    clients = [capsa.client() for _ in range(size)]
    release = threading.Barrier(size + 1)

    def post(api: ApiClient) -> str:
        api.raw("GET", "/v1")  # connected before the burst
        release.wait()
        return str(api.create_capsule(capsule_template(f"bench-burst-{token()}"))["uuid"])

    try:
        with ThreadPoolExecutor(size) as pool:
            futures = [pool.submit(post, api) for api in clients]
            release.wait()
            began = time.perf_counter()
            return began, [f.result() for f in futures]
    finally:
        for api in clients:
            api.close()


def wait_all_running(capsa: CapsaUp, uuids: list[str]) -> float:
    """When the API first showed the last capsule of ``uuids`` Running (time.perf_counter()),
    each followed by a client of its own."""

    def follow(uuid: str) -> float:
        with capsa.client() as api:
            return api.wait_until(uuid, is_running, _TIMEOUT)

    with ThreadPoolExecutor(len(uuids)) as pool:
        return max(pool.map(follow, uuids))


async def _gather(*coroutines: Coroutine[Any, Any, T]) -> list[T]:
    return list(await asyncio.gather(*coroutines))
