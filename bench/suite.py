"""The run: how many rounds of what (:class:`Plan`), the instances the cases share, and the
interleaving of the two sides of a comparison.

Everything a case starts or makes is registered with the :class:`Session` as soon as it exists,
and the session removes it all when the run ends, fails or is interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from bench import host, stats
from bench.instance import (
    REFERENCE_HANDLER,
    CapsaUp,
    InstanceSettings,
    PairedRuntime,
    Workspace,
    remove_all_sandboxes,
    remove_instance,
)
from bench.reference import ReferencePods
from capsa.cri.client import CriClient

T = TypeVar("T")

CASES = ("start", "burst", "cni", "api", "scheduler", "memory")
# Cases that compare capsa with a reference on the paired containerd.
PAIRED_CASES = ("start", "burst", "cni")


@dataclass(frozen=True)
class Plan:
    """The counts of a run: the issue's own, or tiny ones for the smoke run."""

    smoke: bool = False
    warmup: int = 2
    start_rounds: int = 20
    burst_size: int = 20
    # Ten, not five: a median of five rounds left the ratio's interval about ±0.15 wide.
    burst_rounds: int = 10
    cni_rounds: int = 50
    api_capsules: int = 5000
    api_list_requests: int = 200
    # Lists after every capsule changed (nothing of the last list can be reused).
    api_cold_list_requests: int = 20
    api_get_requests: int = 2000
    api_clients: tuple[int, ...] = (1, 8)
    scheduler_hosts: int = 1000
    scheduler_placements: int = 10000
    memory_capsules: int = 50

    @classmethod
    def smoke_plan(cls) -> Plan:
        return cls(
            smoke=True,
            warmup=1,
            start_rounds=2,
            burst_size=3,
            burst_rounds=1,
            cni_rounds=3,
            api_capsules=60,
            api_list_requests=5,
            api_cold_list_requests=2,
            api_get_requests=20,
            scheduler_hosts=20,
            scheduler_placements=100,
            memory_capsules=3,
        )

    def with_rounds(self, rounds: int) -> Plan:
        return replace(self, start_rounds=rounds, burst_rounds=rounds, cni_rounds=rounds)


def interleave(
    sides: dict[str, Callable[[], dict[str, float]]],
    rounds: int,
    warmup: int,
    *,
    settle: float = 0.0,
) -> dict[str, list[float]]:
    """Runs the sides in turn (A, B, A, B, ...), ``warmup`` rounds unrecorded first, with a pause
    of ``settle`` seconds after each side's round: what a side leaves to the kernel after its
    answers then lands on no other side's calls.

    Each side returns its named durations for one round; the samples are keyed
    ``<side>.<name>``.
    """
    samples: dict[str, list[float]] = {}
    for number in range(warmup + rounds):
        for side, one_round in sides.items():
            measured = one_round()
            if number >= warmup:
                for name, seconds in measured.items():
                    samples.setdefault(f"{side}.{name}", []).append(seconds)
            if settle:
                time.sleep(settle)
    return samples


def metered(
    one_round: Callable[[], dict[str, float]], pids: dict[str, int]
) -> Callable[[], dict[str, float]]:
    """``one_round``, also returning the CPU seconds each process of ``pids`` used during it
    (``cpu_<name>``; containerd's count includes the CNI plugins it ran)."""

    def measured() -> dict[str, float]:
        before = {name: host.cpu_seconds(pid) for name, pid in pids.items()}
        durations = one_round()
        used = {f"cpu_{n}": host.cpu_seconds(pid) - before[n] for n, pid in pids.items()}
        return {**durations, **used}

    return measured


def cpu_medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """Median CPU milliseconds per round of each ``<side>.cpu_<process>`` series."""
    return {
        series.replace(".cpu_", ": "): round(stats.median(values) * 1000, 1)
        for series, values in samples.items()
        if ".cpu_" in series
    }


@dataclass
class Paired:
    """capsa on the paired containerd, and the reference pods on the same containerd."""

    settings: InstanceSettings
    runtime: PairedRuntime
    capsa: CapsaUp
    cri: CriClient
    reference: ReferencePods

    def processes(self, with_capsa: bool) -> dict[str, int]:
        """The pids whose CPU a round of one side uses: containerd, and capsa for its side."""
        pids = {"containerd": self.runtime.containerd.process.pid or 0}
        if with_capsa:
            pids["capsa"] = self.capsa.pid
        return pids


class Session:
    """The run's workspace, event loop (for capsa's async runtime and CRI code) and instances."""

    def __init__(self, plan: Plan, trace: bool = False) -> None:
        self.plan = plan
        self.loop = asyncio.new_event_loop()
        self._cleanups = contextlib.ExitStack()
        self.workspace = Workspace()
        self._cleanups.callback(self.workspace.remove)
        # Where the paired capsa writes its call trace (bench.tracing), when asked to.
        self.trace_path = self.workspace.root / "paired-trace.jsonl" if trace else None
        self._paired: Paired | None = None
        self._paired_cleanups: contextlib.ExitStack | None = None

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        """Stops and removes everything the run started and made."""
        try:
            self.close_paired()
            self._cleanups.close()
        finally:
            self.loop.close()

    # ---- instances ----

    def paired(self) -> Paired:
        """capsa and the reference on one containerd, started on first use."""
        if self._paired is None:
            # Whatever a start that failed before left is removed before a new one.
            self.close_paired()
            stack = self._paired_cleanups = contextlib.ExitStack()
            settings = InstanceSettings(self.workspace, "paired")
            stack.callback(remove_instance, settings)
            runtime = PairedRuntime(settings)
            stack.callback(runtime.forget_reference)
            self.run(runtime.start())
            capsa = CapsaUp(
                settings, {"CAPSA_CONTAINERD_SOCKET": runtime.cri_socket}, self.trace_path
            )
            stack.callback(capsa.stop)
            # The reference pods (and any stragglers) go while capsa's CNI daemon still answers
            # their sandboxes' DEL, after capsa's own capsules (whose sandboxes it would remake).
            stack.callback(lambda: asyncio.run(remove_all_sandboxes(runtime.cfg)))
            stack.callback(capsa.delete_all_capsules)
            capsa.start()
            cri = self.run(_cri_client(runtime.cri_socket))
            stack.callback(lambda: self.run(cri.close()))
            reference = ReferencePods(
                cri, capsa.config, REFERENCE_HANDLER, settings.state_dir / "reference" / "pods"
            )
            self._paired = Paired(settings, runtime, capsa, cri, reference)
        return self._paired

    def close_paired(self) -> None:
        if self._paired_cleanups is not None:
            self._paired_cleanups.close()
        self._paired = self._paired_cleanups = None

    @contextlib.contextmanager
    def standard_capsa(
        self, name: str, cidr_prefix: int = 24, runs_capsules: bool = True
    ) -> Iterator[CapsaUp]:
        """A fresh ``capsa up`` with its own containerd and registry, as ``make up`` runs it.

        Its capsules are deleted through the API before it stops, unless it ``runs_capsules``
        not (records stored for a host that does not exist would never go).
        """
        settings = InstanceSettings(self.workspace, name, cidr_prefix)
        with contextlib.ExitStack() as stack:
            stack.callback(remove_instance, settings)
            capsa = CapsaUp(settings)
            stack.callback(capsa.stop, delete_capsules=runs_capsules)
            capsa.start()
            yield capsa


async def _cri_client(socket: str) -> CriClient:
    # A gRPC channel belongs to the loop it is made in: the session's.
    return CriClient(socket, timeout=30.0, pull_timeout=300.0)
