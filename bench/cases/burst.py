"""Case 2: a burst of capsules created at once, wall time until the API shows all of them Running,
against as many raw CRI pods made at once on the same containerd."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from bench.api_client import GONE, ApiClient, ApiError
from bench.cases.start import anchored, remove_reference_logs
from bench.host import token
from bench.instance import CapsaUp
from bench.reference import capsule_template
from bench.report import CaseResult, Target, compared
from bench.suite import Session, cpu_medians, interleave, metered

T = TypeVar("T")

BURST_TARGET = Target("ratio", "<=", 1.2, "ratio <= 1.2")
_TIMEOUT = 300.0
# One client lists the burst this often. Twenty clients that each wait for their capsule's changes
# (as the start case's does) would get some 130 answers per burst, each a capsule loaded and
# encoded: about 0.2 s more of capsa's CPU per round than these lists, on 2 cores that the burst
# keeps busy.
LIST_INTERVAL_S = 0.05


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
            "list_interval_s": LIST_INTERVAL_S,
        },
    )
    with paired.capsa.client() as api, anchored(session, paired, api):

        def capsa_round() -> dict[str, float]:
            began, uuids = create_at_once(paired.capsa, size)
            finished = wait_all_running(api, uuids, LIST_INTERVAL_S)
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
            samples["capsa.burst"],
            samples["reference.burst"],
            BURST_TARGET,
        )
    ]
    result.notes = [
        f"capsa: {size} POSTs from {size} threads released together, then GET "
        f"/v1/capsules every {LIST_INTERVAL_S * 1000:g} ms until all are Running.",
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
        return str(api.create_capsule(capsule_template(f"bench-burst-{token()}")).capsule["uuid"])

    try:
        with ThreadPoolExecutor(size) as pool:
            futures = [pool.submit(post, api) for api in clients]
            release.wait()
            began = time.perf_counter()
            return began, [f.result() for f in futures]
    finally:
        for api in clients:
            api.close()


def wait_all_running(api: ApiClient, uuids: list[str], interval: float) -> float:
    """When a list first showed every capsule of ``uuids`` Running (time.perf_counter()); the
    API is listed every ``interval`` seconds."""
    wanted = set(uuids)
    deadline = time.perf_counter() + _TIMEOUT
    while True:
        status = {c["uuid"]: c["status"] for c in api.capsules() if c["uuid"] in wanted}
        seen = time.perf_counter()
        if len(status) == len(wanted) and all(s == "Running" for s in status.values()):
            return seen
        failed = [uuid for uuid, s in status.items() if s == "Error"]
        if failed:
            raise ApiError(f"capsules failed: {api.capsule(failed[0])}")
        if seen > deadline:
            raise ApiError(f"not all Running after {_TIMEOUT:g}s: {status}")
        time.sleep(interval)


async def _gather(*coroutines: Coroutine[Any, Any, T]) -> list[T]:
    return list(await asyncio.gather(*coroutines))
