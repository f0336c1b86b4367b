"""A profiling aid, not a benchmark: ``capsa up`` with every call on a capsule's path timed.

``python -m bench --trace ...`` runs the paired capsa as ``python -m bench.tracing TRACE up``:
before capsa starts, the async methods of its CRI client, stores, network service, image puller
and the API's capsule handlers, and the methods of the CNI daemon's service and of the store
statements its threads run, are wrapped so that each call appends one JSON line to TRACE: its
name, the asyncio task (or the thread) that made it, and when it began and ended.
:func:`timeline` then lays one capsule's start or teardown out call by call, with the gaps
between them (time in capsa's own code, or waiting for the event loop), and :func:`summary`
counts and times each kind of call over the measured rounds.

The wrappers cost a few microseconds per call; use the trace to see where time goes, never for
the numbers of the table.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench import stats

_TRACED: tuple[tuple[str, str], ...] = (
    ("capsa.cri.client", "CriClient"),
    ("capsa.store.capsules", "CapsuleStore"),
    ("capsa.store.hosts", "HostStore"),
    ("capsa.store.ports", "PortStore"),
    ("capsa.network.service", "NetworkService"),
    ("capsa.compute.images", "ImagePuller"),
    ("capsa.scheduler.service", "Scheduler"),
    ("capsa.network.agent", "NetworkAgent"),
    ("capsa.store.networks", "NetworkStore"),
)
# Classes whose plain methods run on the CNI daemon's threads: their blocking calls are traced.
_TRACED_ON_THREADS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("capsa.cni.daemon", "_CniService", ()),
    ("capsa.store.ports", "PortStore", ("to_bind", "set_bindings", "clear_device_bindings")),
)
_TRACED_FUNCTIONS: tuple[tuple[str, str], ...] = (
    ("capsa.api.capsules", "create_capsule"),
    ("capsa.api.capsules", "show_capsule"),
    ("capsa.api.capsules", "list_capsules"),
    ("capsa.api.capsules", "delete_capsule"),
)


def install(out: Callable[[str], object]) -> None:
    """Wraps the traced coroutine methods and functions; ``out`` takes each JSON line."""
    import importlib

    def record(name: str, caller: str, began: float, args: Any, kwargs: Any, returned: Any) -> None:
        out(
            json.dumps(
                {
                    "call": name,
                    "task": caller,
                    "begin": began,
                    "end": time.time(),
                    "subject": _subject(args, kwargs),
                    # A new sandbox's or container's id, to follow a capsule's calls.
                    "returned": returned if isinstance(returned, str) else None,
                }
            )
        )

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def traced(*args: Any, **kwargs: Any) -> Any:
            task = asyncio.current_task()
            began = time.time()
            returned = None
            try:
                returned = await fn(*args, **kwargs)
                return returned
            finally:
                record(name, task.get_name() if task else "", began, args, kwargs, returned)

        return traced

    def wrap_blocking(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def traced(*args: Any, **kwargs: Any) -> Any:
            began = time.time()
            returned = None
            try:
                returned = fn(*args, **kwargs)
                return returned
            finally:
                record(name, threading.current_thread().name, began, args, kwargs, returned)

        return traced

    for module_name, class_name, only in _TRACED_ON_THREADS:
        cls = getattr(importlib.import_module(module_name), class_name)
        for attribute, value in list(vars(cls).items()):
            traced = not only or attribute in only
            if traced and inspect.isfunction(value) and not attribute.startswith("__"):
                setattr(cls, attribute, wrap_blocking(f"{class_name}.{attribute}", value))
    for module_name, class_name in _TRACED:
        cls = getattr(importlib.import_module(module_name), class_name)
        for attribute, value in list(vars(cls).items()):
            if inspect.iscoroutinefunction(value) and not attribute.startswith("__"):
                setattr(cls, attribute, wrap(f"{class_name}.{attribute}", value))
    for module_name, function_name in _TRACED_FUNCTIONS:
        module = importlib.import_module(module_name)
        setattr(module, function_name, wrap(function_name, getattr(module, function_name)))


def _subject(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The first argument that looks like a uuid or a CRI id, to tell capsules apart."""
    for value in (*args[1:], *kwargs.values()):
        if isinstance(value, str) and len(value) in (36, 64):
            return value
        for attribute in ("uuid", "uid"):
            ident = getattr(value, attribute, None)
            if isinstance(ident, str):
                return ident
    return ""


def load(path: Path) -> list[dict[str, Any]]:
    with path.open() as lines:
        return [json.loads(line) for line in lines if line.strip()]


def calls_between(
    calls: Iterable[dict[str, Any]], begin: float, end: float
) -> list[dict[str, Any]]:
    """Calls that began in [begin, end], in the order they began."""
    return sorted((c for c in calls if begin <= c["begin"] <= end), key=lambda c: c["begin"])


def timeline(calls: list[dict[str, Any]], begin: float, end: float) -> str:
    """One round, call by call: offset from ``begin``, duration, task and call (nested calls
    of the same task are indented under the call that contains them)."""
    lines = []
    window = calls_between(calls, begin, end)
    open_calls: list[dict[str, Any]] = []
    for call in window:
        open_calls = [
            c for c in open_calls if c["end"] > call["begin"] and c["task"] == call["task"]
        ]
        depth = len(open_calls)
        offset = (call["begin"] - begin) * 1000
        took = (call["end"] - call["begin"]) * 1000
        lines.append(
            f"{offset:8.1f} ms {took:7.1f} ms  {call['task'][:24]:<24} {'  ' * depth}{call['call']}"
        )
        open_calls.append(call)
    return "\n".join(lines)


def summary(
    calls: list[dict[str, Any]], windows: list[tuple[float, float]]
) -> list[dict[str, Any]]:
    """Per kind of call over the windows (one per measured round): how many per round, median
    duration, and the median total per round."""
    per_round: dict[str, list[list[float]]] = {}
    for begin, end in windows:
        seen: dict[str, list[float]] = {}
        for call in calls_between(calls, begin, end):
            seen.setdefault(call["call"], []).append(call["end"] - call["begin"])
        for name, durations in seen.items():
            per_round.setdefault(name, []).append(durations)
    rows = []
    for name, rounds in per_round.items():
        every = [d for durations in rounds for d in durations]
        rows.append(
            {
                "call": name,
                "per_round": round(len(every) / len(windows), 1),
                "median_ms": round(stats.median(every) * 1000, 2),
                "total_per_round_ms": round(stats.median([sum(r) for r in rounds]) * 1000, 1),
            }
        )
    return sorted(rows, key=lambda r: -float(r["total_per_round_ms"]))


def render_summary(title: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"{title} (traced calls per round, median duration, median total per round):"]
    for row in rows:
        lines.append(
            f"  {row['call']:<40} {row['per_round']:5.1f} x {row['median_ms']:7.2f} ms"
            f"  = {row['total_per_round_ms']:7.1f} ms"
        )
    return "\n".join(lines)


def analyse(trace: Path, rounds: list[dict[str, float]]) -> dict[str, Any]:
    """Summaries of the start and teardown windows of ``rounds`` (client wall-clock times),
    and the timelines of the round with the median start and of the one with the median
    teardown."""
    calls = load(trace)
    report: dict[str, Any] = {}
    for phase, begin, end in (
        ("start", "POST sent", "Running seen"),
        ("teardown", "DELETE sent", "404 seen"),
    ):
        windows = [(r[begin], r[end]) for r in rounds]
        ordered = sorted(windows, key=lambda w: w[1] - w[0])
        middle = ordered[len(ordered) // 2]
        report[f"{phase}_calls"] = summary(calls, windows)
        report[f"{phase}_timeline"] = timeline(calls, *middle)
    return report


def main() -> int:
    trace_path = Path(sys.argv[1])
    output = trace_path.open("a", buffering=1)
    install(lambda line: output.write(line + "\n"))
    from capsa.cli.main import main as capsa_main

    return capsa_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
