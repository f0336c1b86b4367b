"""Which hosts can take a capsule, which one should, and why none could.

Pure functions over host records, so that placement is cheap (the scheduler keeps its own view of
the hosts between claims) and testable without a database.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import replace

from capsa.model.host import Host, PlacementRequest


def fits(host: Host, request: PlacementRequest) -> bool:
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


class HostChooser:
    """The scheduler's view of the hosts during a pass: the best host that fits a request, and
    the room each choice takes, without sorting every host for every capsule.

    A heap keyed on the weight holds each host once; taking room changes a host's weight, so the
    chosen host goes back with its new weight. Hosts that do not fit one request are set aside
    and come back for the next.
    """

    def __init__(self, hosts: Iterable[Host]) -> None:
        self.hosts = {h.name: h for h in hosts}
        self._heap = [(-weight(h), h.name) for h in self.hosts.values()]
        heapq.heapify(self._heap)

    def take(self, request: PlacementRequest) -> Host | None:
        """The best host for ``request``, with the request's room already taken from it."""
        passed_over = []
        chosen = None
        while self._heap:
            entry = heapq.heappop(self._heap)
            host = self.hosts[entry[1]]
            if fits(host, request):
                chosen = host
                break
            passed_over.append(entry)
        for entry in passed_over:
            heapq.heappush(self._heap, entry)
        if chosen is None:
            return None
        self._account(chosen.name, request.cpu_millis, request.memory_mb)
        return chosen

    def give_back(self, host_name: str, request: PlacementRequest) -> None:
        """Undoes a :meth:`take` whose claim did not happen."""
        self._heap = [e for e in self._heap if e[1] != host_name]
        heapq.heapify(self._heap)
        self._account(host_name, -request.cpu_millis, -request.memory_mb)

    def _account(self, host_name: str, cpu_millis: int, memory_mb: int) -> None:
        host = self.hosts[host_name]
        host = replace(
            host,
            cpu_millis_used=host.cpu_millis_used + cpu_millis,
            memory_mb_used=host.memory_mb_used + memory_mb,
        )
        self.hosts[host_name] = host
        heapq.heappush(self._heap, (-weight(host), host_name))


def explain_no_fit(hosts: list[Host], request: PlacementRequest) -> str:
    """Why no host fits, in terms a tenant or an operator can act on; it names no host, since
    tenants read it and hosts are for admins."""
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
        f"{prefix}; the host with the most room has "
        f"{roomiest.cpu_millis_free / 1000:g} cpu and {roomiest.memory_mb_free} MiB free"
    )
