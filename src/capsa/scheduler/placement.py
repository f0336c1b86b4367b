"""Which hosts can take a capsule, which one should, and why none could.

Pure functions over host records, so that placement is cheap (the scheduler keeps its own view of
the hosts between claims) and testable without a database.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from capsa.model.host import Host


@dataclass(frozen=True)
class Request:
    cpu_millis: int
    memory_mb: int
    # None: any host, on its default runtime.
    runtime: str | None


def fits(host: Host, request: Request) -> bool:
    return (
        not host.disabled
        and (request.runtime in host.runtimes if request.runtime else bool(host.runtimes))
        and host.cpu_millis_free >= request.cpu_millis
        and host.memory_mb_free >= request.memory_mb
    )


def weight(host: Host) -> float:
    """Spreads capsules: the host with the largest free share of its scarcer resource wins."""
    cpu_share = host.cpu_millis_free / host.cpu_millis if host.cpu_millis else 0.0
    memory_share = host.memory_mb_free / host.memory_mb if host.memory_mb else 0.0
    return min(cpu_share, memory_share)


def rank(hosts: Iterable[Host], request: Request) -> list[Host]:
    """Hosts that fit ``request``, best first."""
    return sorted((h for h in hosts if fits(h, request)), key=weight, reverse=True)


def explain_no_fit(hosts: list[Host], request: Request) -> str:
    """Why no host fits, in terms a tenant or an operator can act on."""
    wanted = f"{request.cpu_millis / 1000:g} cpu and {request.memory_mb} MiB"
    runtime = request.runtime or "the default runtime"
    prefix = f"no host can run this capsule: it needs {wanted} on {runtime}"
    if not hosts:
        return f"{prefix}, and no compute host is up"
    enabled = [h for h in hosts if not h.disabled]
    if not enabled:
        return f"{prefix}, and every host is disabled"
    with_runtime = [
        h for h in enabled if (request.runtime in h.runtimes if request.runtime else h.runtimes)
    ]
    if not with_runtime:
        offered = sorted({r for h in enabled for r in h.runtimes})
        return f"{prefix}; the hosts offer the runtimes {', '.join(offered) or 'none'}"
    roomiest = max(with_runtime, key=lambda h: (h.cpu_millis_free, h.memory_mb_free))
    return (
        f"{prefix}; the host with the most room ({roomiest.name}) has "
        f"{roomiest.cpu_millis_free / 1000:g} cpu and {roomiest.memory_mb_free} MiB free"
    )
