"""``python -m bench.compare BEFORE.json AFTER.json``: how two runs of the suite differ, row by
row (bench/README.md, "Comparing two runs").

A comparison row shows each run's ratio with its interval, and how many times BEFORE's ratio
AFTER's is, with the bootstrap interval of that change (:func:`bench.stats.change_interval`):
``faster`` or ``slower`` when the interval leaves 1 out, ``within chance`` when it holds it.
The other rows show both runs' numbers side by side. Exits 2 when a file is not a run's JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import stats
from bench.report import markdown

COLUMNS = ("case", "measure", "before", "after", "after / before", "95% CI", "change")


class NotARun(Exception):
    pass


def load(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise NotARun(f"{path}: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("summary"), list):
        raise NotARun(f"{path}: not the JSON of a `python -m bench` run (no summary)")
    return document


def compare(before: dict[str, Any], after: dict[str, Any]) -> list[list[str]]:
    """The table's lines: every row of ``after`` that ``before`` has too, in ``after``'s order."""
    earlier = {(row["case"], row["measure"]): row for row in before["summary"]}
    lines = []
    for row in after["summary"]:
        old = earlier.get((row["case"], row["measure"]))
        if old is not None:
            lines.append([row["case"], row["measure"], *_compared(old, row, before, after)])
    return lines


def _compared(
    old: dict[str, Any], new: dict[str, Any], before: dict[str, Any], after: dict[str, Any]
) -> list[str]:
    if old.get("ratio") is None or new.get("ratio") is None:
        return [_number(old), _number(new), "", "", ""]
    cells = [_ratio(old), _ratio(new), f"{new['ratio'] / old['ratio']:.2f}"]
    old_samples, new_samples = _samples(old, before), _samples(new, after)
    if old_samples is None or new_samples is None:
        # Runs from before rows named their series: no interval to judge the change by.
        return [*cells, "", ""]
    low, high = stats.change_interval(old_samples, new_samples)
    change = "faster" if high < 1 else "slower" if low > 1 else "within chance"
    return [*cells, f"{low:.2f}-{high:.2f}", change]


def _samples(
    row: dict[str, Any], run: dict[str, Any]
) -> tuple[Sequence[float], Sequence[float]] | None:
    series = row.get("series")
    samples = run.get("cases", {}).get(row["case"], {}).get("samples", {})
    if not series or any(name not in samples for name in series):
        return None
    return samples[series[0]], samples[series[1]]


def _ratio(row: dict[str, Any]) -> str:
    if row.get("ratio_low") is None:
        return f"{row['ratio']:.2f}"
    return f"{row['ratio']:.2f} ({row['ratio_low']:.2f}-{row['ratio_high']:.2f})"


def _number(row: dict[str, Any]) -> str:
    if row.get("value") is not None:
        return f"{row['value']:,.1f} {row['unit']}"
    p50 = f"p50 {row['median'] * 1000:.1f} ms"
    return p50 if row.get("p99") is None else f"{p50}, p99 {row['p99'] * 1000:.1f} ms"


def _header(name: str, run: dict[str, Any]) -> str:
    machine = run.get("machine", {})
    return (
        f"{name}: {run.get('started_at', '?')}, capsa at {machine.get('capsa_commit', '?')}, "
        f"{run.get('mode', '?')} run, load average {_load(machine)}"
    )


def _load(machine: dict[str, Any]) -> str:
    load = machine.get("load_average")
    return f"{load[0]:.2f}" if load else "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument("before", type=Path, help="the earlier run's JSON (bench/results/)")
    parser.add_argument("after", type=Path, help="the later run's JSON")
    args = parser.parse_args(argv)
    try:
        before, after = load(args.before), load(args.after)
    except NotARun as exc:
        print(f"python -m bench.compare: {exc}", file=sys.stderr)
        return 2
    print(_header("before", before))
    print(_header("after", after))
    print()
    print(markdown(COLUMNS, compare(before, after)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
