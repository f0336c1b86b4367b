"""Where a capsule's start and teardown spend their time, from capsa's own log lines.

capsa logs each step of a capsule with its uuid and a millisecond timestamp (capsa.log's text
format); with the client's wall-clock times of the request and of the answer it saw, the steps
give a breakdown of every measured round: medians of the gaps between consecutive steps.
"""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import stats

# Log messages of a capsule's start and teardown, in the order they happen.
START_STEPS = (
    "capsule accepted",
    "capsule placed",
    "port allocated",
    "port bound",
    "sandbox running",
    "container started",
)
TEARDOWN_STEPS = ("capsule deletion requested", "port unplugged", "capsule deleted")

_LINE = re.compile(
    r"^(?P<stamp>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z \S+\s+\S+: (?P<message>.*?) "
    r"(?:\S+=\S+ )*?capsule=(?P<capsule>[0-9a-f-]{36})\b"
)


def step_times(log_path: Path, capsules: set[str]) -> dict[str, dict[str, float]]:
    """For each capsule of ``capsules``: the first time (epoch seconds) of each logged step."""
    found: dict[str, dict[str, float]] = {}
    steps = set(START_STEPS + TEARDOWN_STEPS)
    with log_path.open(errors="replace") as lines:
        for line in lines:
            match = _LINE.match(line)
            if match is None or match["capsule"] not in capsules:
                continue
            message = match["message"]
            if message not in steps:
                continue
            stamp = datetime.fromisoformat(match["stamp"]).replace(tzinfo=UTC).timestamp()
            found.setdefault(match["capsule"], {}).setdefault(message, stamp)
    return found


def breakdown(
    rounds: list[dict[str, float]], steps: tuple[str, ...], begin: str, end: str
) -> list[dict[str, Any]]:
    """Median and p95 of each gap, from ``begin`` (the client's request) through ``steps`` to
    ``end`` (what the client saw), over the rounds that logged every step."""
    chain = (begin, *steps, end)
    complete = [r for r in rounds if all(name in r for name in chain)]
    gaps = []
    for before, after in itertools.pairwise(chain):
        samples = [r[after] - r[before] for r in complete]
        if samples:
            gaps.append(
                {
                    "from": before,
                    "to": after,
                    "median_ms": round(stats.median(samples) * 1000, 1),
                    "p95_ms": round(stats.p95(samples) * 1000, 1),
                    "rounds": len(samples),
                }
            )
    return gaps


def render(title: str, gaps: list[dict[str, Any]]) -> str:
    lines = [f"{title} (median / p95 of each step, from capsa's log, ms resolution):"]
    for gap in gaps:
        lines.append(
            f"  {gap['from']:>28} -> {gap['to']:<28} {gap['median_ms']:7.1f} ms"
            f"  {gap['p95_ms']:7.1f} ms"
        )
    return "\n".join(lines)
