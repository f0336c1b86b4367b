"""Case 4: capsa's API with many capsules in its database: GET /v1/capsules?limit=1000 and GET one
capsule by name, from 1 and from 8 concurrent clients.

The capsules (two containers each, with a port each so that their addresses show) are written
through capsa's store directly into the database of a fresh ``capsa up``, on a host name that is
not the instance's, so that neither its scheduler nor its agent acts on them. The clients are
threads of the benchmark process with plain http.client connections (kept alive), never in
capsa's event loop.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import update
from sqlalchemy.engine import Connection

from bench.api_client import ApiClient, ApiError
from bench.instance import CapsaUp
from bench.report import CaseResult, Row, Target, latencies, single
from bench.suite import Session
from capsa.model.capsule import (
    Capsule,
    CapsuleSpec,
    Container,
    ContainerKind,
    ContainerSpec,
    PortSpec,
    Status,
)
from capsa.model.clock import utcnow
from capsa.network.service import NetworkService
from capsa.store import Store, schema

LIST_TARGET = Target("p99", "<", 0.1, "p99 < 100 ms at 1 client")
# The project of capsa.client()'s token: the admin's, which capsa up bootstraps.
_PROJECT = "admin"
_ELSEWHERE = "bench-api-elsewhere"
_WARMUP_REQUESTS = 5


def run(session: Session) -> CaseResult:
    plan = session.plan
    result = CaseResult(
        "api",
        parameters={
            "capsules": plan.api_capsules,
            "containers_per_capsule": 2,
            "list_requests": plan.api_list_requests,
            "get_requests": plan.api_get_requests,
            "clients": list(plan.api_clients),
        },
    )
    # A /16 default network: every capsule gets an address.
    with session.standard_capsa("api", cidr_prefix=16, runs_capsules=False) as capsa:
        began = time.monotonic()
        names = session.run(fill(capsa, plan.api_capsules))
        result.details["fill_seconds"] = round(time.monotonic() - began, 1)
        with capsa.client() as api:
            status, body = api.json("GET", "/v1/capsules?limit=1")
            if status != 200 or not body["capsules"][0]["addresses"]:
                raise ApiError(f"the stored capsules do not show addresses: {status} {body}")
        list_path = "/v1/capsules?limit=1000"
        for clients in plan.api_clients:
            target = LIST_TARGET if clients == 1 else None
            samples, rate = measure(capsa, clients, plan.api_list_requests, lambda: list_path)
            result.samples[f"list.{clients}"] = samples
            result.rows += _rows(f"GET list limit=1000, {clients} client(s)", samples, rate, target)
        cold = session.run(measure_cold_lists(capsa, plan.api_cold_list_requests, list_path))
        result.samples["list.cold"] = cold
        result.rows.append(
            latencies("api", "GET list limit=1000, every capsule changed since, 1 client", cold)
        )
        for clients in plan.api_clients:
            samples, rate = measure(
                capsa,
                clients,
                plan.api_get_requests,
                lambda: f"/v1/capsules/{random.choice(names)}",
            )
            result.samples[f"get.{clients}"] = samples
            result.rows += _rows(f"GET one by name, {clients} client(s)", samples, rate, None)
    result.notes = [
        f"{plan.api_capsules} capsules of 2 containers with a port each, stored through "
        "capsa's CapsuleStore and NetworkService; requests from threads with http.client "
        f"(kept alive); {_WARMUP_REQUESTS} unrecorded requests per client first.",
    ]
    return result


def _rows(measure: str, samples: list[float], rate: float, target: Target | None) -> list[Row]:
    return [
        latencies("api", measure, samples, target),
        single("api", f"{measure}: throughput", rate, "req/s", n=len(samples)),
    ]


async def fill(capsa: CapsaUp, count: int) -> list[str]:
    """Stores ``count`` running capsules of two containers and a port each, in the project of
    the benchmark's client; returns their names."""
    cfg = capsa.config
    store = Store(cfg.database_url)
    await store.open()
    try:
        project = await store.identity.find_project(_PROJECT)
        if project is None:
            raise RuntimeError(f"capsa up did not bootstrap the project {_PROJECT!r}")
        network = NetworkService(
            store, cfg.network.default_cidr, cfg.network.mtu, cfg.network.default_prefixlen
        )
        names = []
        for number in range(count):
            capsule = _capsule(f"bench-api-{number:05d}", project.id)
            await store.capsules.create(capsule)
            await network.allocate_ports(capsule.uuid, project.id, _ELSEWHERE)
            names.append(capsule.name)
        return names
    finally:
        await store.close()


def _capsule(name: str, project_id: str) -> Capsule:
    capsule_uuid = str(uuid.uuid4())
    specs = (
        ContainerSpec(
            name="web",
            image="busybox",
            cpu_millis=100,
            memory_mb=64,
            command=("httpd", "-f", "-p", "80"),
            env={"GREETING": "hello"},
            ports=(PortSpec(container_port=80),),
        ),
        ContainerSpec(
            name="sidecar", image="busybox", cpu_millis=100, memory_mb=32, command=("sleep", "1d")
        ),
    )
    capsule = Capsule(
        uuid=capsule_uuid,
        project_id=project_id,
        user_id="bench",
        spec=CapsuleSpec(name=name, containers=specs, labels={"app": "bench"}),
        status=Status.RUNNING,
        task_state=None,
        host=_ELSEWHERE,
    )
    capsule.containers = [
        Container(
            uuid=str(uuid.uuid4()),
            capsule_uuid=capsule_uuid,
            project_id=project_id,
            user_id="bench",
            kind=ContainerKind.APP,
            position=position,
            spec=spec,
            status=Status.RUNNING,
        )
        for position, spec in enumerate(specs)
    ]
    return capsule


def measure(
    capsa: CapsaUp, clients: int, requests: int, next_path: Callable[[], str]
) -> tuple[list[float], float]:
    """``requests`` GETs shared out among ``clients`` threads, each on its own connection;
    returns every request's latency and the requests per second over the whole burst."""
    per_client = [requests // clients + (i < requests % clients) for i in range(clients)]
    release = threading.Barrier(clients + 1)
    latencies_by_client: list[list[float]] = [[] for _ in range(clients)]

    def client(number: int) -> None:
        with capsa.client() as api:
            for _ in range(_WARMUP_REQUESTS):
                _get(api, next_path())
            release.wait()
            for _ in range(per_client[number]):
                path = next_path()
                began = time.perf_counter()
                _get(api, path)
                latencies_by_client[number].append(time.perf_counter() - began)

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, n) for n in range(clients)]
        release.wait()
        began = time.perf_counter()
        for future in futures:
            future.result()
        elapsed = time.perf_counter() - began
    samples = [s for client_samples in latencies_by_client for s in client_samples]
    return samples, len(samples) / elapsed


async def measure_cold_lists(capsa: CapsaUp, requests: int, path: str) -> list[float]:
    """Lists that find every capsule changed since the list before (the worst case for capsa's
    reuse of encoded capsules): each request follows a store write that touches them all."""
    store = Store(capsa.config.database_url)
    await store.open()
    samples = []
    try:
        with capsa.client() as api:
            for _ in range(requests):
                await store.db.run_write(_touch_every_capsule)
                began = time.perf_counter()
                await asyncio.to_thread(_get, api, path)
                samples.append(time.perf_counter() - began)
    finally:
        await store.close()
    return samples


def _touch_every_capsule(conn: Connection) -> None:
    conn.execute(update(schema.capsules).values(updated_at=utcnow()))


def _get(api: ApiClient, path: str) -> None:
    status, body = api.raw("GET", path)
    if status != 200:
        raise ApiError(f"GET {path} answered {status}: {body[:300]!r}")
