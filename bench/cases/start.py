"""Case 1: a 1-container busybox capsule from API POST to Running (as the API shows it) and from
DELETE to 404, against the same pod made and removed with raw CRI calls on the same containerd
with the reference bridge + host-local plugins."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from bench import phases, stats, tracing
from bench.api_client import GONE, RUNNING, ApiClient
from bench.host import token
from bench.reference import capsule_template
from bench.report import CaseResult, Target, compared
from bench.suite import Paired, Session, cpu_medians, interleave, metered

START_TARGET = Target("ratio", "<=", 1.15, "ratio <= 1.15")
TEARDOWN_TARGET = Target("ratio", "<=", 1.15, "ratio <= 1.15")
_TIMEOUT = 120.0


def run(session: Session) -> CaseResult:
    plan = session.plan
    paired = session.paired()
    result = CaseResult(
        "start",
        parameters={
            "rounds": plan.start_rounds,
            "warmup": plan.warmup,
        },
    )
    walls: dict[str, dict[str, float]] = {}
    with paired.capsa.client() as api, anchored(session, paired, api):
        paired.reference.call_seconds.clear()

        def capsa_round() -> dict[str, float]:
            created_wall = time.time()
            began = time.perf_counter()
            created = api.create_capsule(capsule_template(f"bench-start-{token()}"))
            capsule = created.capsule
            running = api.wait_until(capsule["uuid"], RUNNING, _TIMEOUT, created)
            running_wall = time.time()
            deleting = time.perf_counter()
            delete_wall = time.time()
            api.delete_capsule(capsule["uuid"])
            gone = api.wait_until(capsule["uuid"], GONE, _TIMEOUT)
            walls[capsule["uuid"]] = {
                "POST sent": created_wall,
                "Running seen": running_wall,
                "DELETE sent": delete_wall,
                "404 seen": time.time(),
            }
            return {"start": running - began, "teardown": gone - deleting}

        def reference_round() -> dict[str, float]:
            began = time.perf_counter()
            pod = session.run(paired.reference.run())
            running = time.perf_counter()
            session.run(paired.reference.teardown(pod))
            gone = time.perf_counter()
            return {"start": running - began, "teardown": gone - running}

        samples = interleave(
            {
                "capsa": metered(capsa_round, paired.processes(with_capsa=True)),
                "reference": metered(reference_round, paired.processes(with_capsa=False)),
            },
            plan.start_rounds,
            plan.warmup,
        )
    result.samples = samples
    # Both sides' rounds include their teardown.
    result.details["cpu_ms_per_round"] = cpu_medians(samples)
    result.rows = [
        compared(
            "start",
            "1-container capsule: POST -> Running",
            samples,
            ("capsa.start", "reference.start"),
            START_TARGET,
        ),
        compared(
            "start",
            "teardown: DELETE -> 404",
            samples,
            ("capsa.teardown", "reference.teardown"),
            TEARDOWN_TARGET,
        ),
    ]
    result.details.update(step_breakdown(paired.capsa.log_path, walls, plan.warmup))
    result.details["reference_calls_median_ms"] = {
        # One call of each per round: the warm-up rounds' come first.
        method: round(stats.median(seconds[plan.warmup :]) * 1000, 1)
        for method, seconds in paired.reference.call_seconds.items()
    }
    if session.trace_path is not None:
        measured = list(walls.values())[plan.warmup :]
        result.details["trace"] = tracing.analyse(session.trace_path, measured)
    result.notes = [
        "capsa: Zun template POSTed to capsa's API, then GET /v1/capsules/<uuid> on a "
        "kept-alive connection, each held by the API until the capsule changes (If-None-Match, "
        "Prefer: wait), until it says Running; DELETE, then the same until 404.",
        "reference: RunPodSandbox, CreateContainer, StartContainer (and StopContainer, "
        "RemovePodSandbox, the calls capsa makes) with capsa's CriClient on the same "
        "containerd as capsa, under a runtime handler of its own whose cni_conf_dir (containerd "
        "1.6's per-handler CNI conf dir) holds the reference bridge + host-local conflist.",
        "An anchor capsule and an anchor reference pod run throughout, so that both networks' "
        "bridges exist, as on a host that already runs pods.",
    ]
    return result


@contextlib.contextmanager
def anchored(session: Session, paired: Paired, api: ApiClient) -> Iterator[None]:
    """One capsule and one reference pod that run while the case measures others."""
    created = api.create_capsule(capsule_template(f"bench-anchor-{token()}"))
    capsule = created.capsule["uuid"]
    try:
        api.wait_until(capsule, RUNNING, _TIMEOUT, created)
        pod = session.run(paired.reference.run())
        try:
            yield
        finally:
            session.run(paired.reference.teardown(pod))
    finally:
        api.delete_capsule(capsule)
        api.wait_until(capsule, GONE, _TIMEOUT)
        remove_reference_logs(paired)


def remove_reference_logs(paired: Paired) -> None:
    shutil.rmtree(paired.settings.state_dir / "reference" / "pods", ignore_errors=True)


def step_breakdown(
    log_path: Path, walls: dict[str, dict[str, float]], warmup: int
) -> dict[str, object]:
    """The measured rounds' steps (warm-up rounds left out), from capsa's log."""
    measured = dict(list(walls.items())[warmup:])
    logged = phases.step_times(log_path, set(measured))
    rounds = [{**walls[uuid], **logged.get(uuid, {})} for uuid in measured]
    return {
        "start_steps": phases.breakdown(rounds, phases.START_STEPS, "POST sent", "Running seen"),
        "teardown_steps": phases.breakdown(
            rounds, phases.TEARDOWN_STEPS, "DELETE sent", "404 seen"
        ),
    }
