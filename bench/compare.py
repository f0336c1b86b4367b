"""``python -m bench.compare --before RUN.json... --after RUN.json...``: how the runs of the suite
on one side differ from those on the other, row by row (bench/README.md, "Comparing runs").

A compared row shows each side's ratios (one run: its ratio and interval; several: each run's),
how many times the before side's ratio the after side's is (each side's ratio the mean of its
runs'), with the bootstrap interval of that change (:func:`bench.stats.change_interval`):
``faster`` or ``slower`` when the interval leaves 1 out, ``within chance`` when it holds it.
The other rows show every run's number. Exits 2 when a file is not a run's JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench import stats
from bench.report import markdown

COLUMNS = ("case", "measure", "before", "after", "after / before", "95% CI", "change")

Document = dict[str, Any]


class NotARun(Exception):
    pass


def load(path: Path) -> Document:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise NotARun(f"{path}: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("summary"), list):
        raise NotARun(f"{path}: not the JSON of a `python -m bench` run (no summary)")
    return document


def compare(before: list[Document], after: list[Document]) -> list[list[str]]:
    """The table's lines: the rows that every run has, in the first after run's order."""
    runs = [*before, *after]
    lines = []
    for row in after[0]["summary"]:
        key = (row["case"], row["measure"])
        rows = [_row(run, key) for run in runs]
        if all(r is not None for r in rows):
            found = [r for r in rows if r is not None]
            lines.append([*key, *_compared(found[: len(before)], found[len(before) :], runs)])
    return lines


def _row(run: Document, key: tuple[str, str]) -> dict[str, Any] | None:
    return next((r for r in run["summary"] if (r["case"], r["measure"]) == key), None)


def _compared(
    old: list[dict[str, Any]], new: list[dict[str, Any]], runs: list[Document]
) -> list[str]:
    if any(r.get("ratio") is None for r in [*old, *new]):
        return [_numbers(old), _numbers(new), "", "", ""]
    change = statistics.fmean(r["ratio"] for r in new) / statistics.fmean(r["ratio"] for r in old)
    cells = [_ratios(old), _ratios(new), f"{change:.2f}"]
    samples = [_samples(row, run) for row, run in zip([*old, *new], runs, strict=True)]
    if any(s is None for s in samples):
        # Runs from before rows named their series: no interval to judge the change by.
        return [*cells, "", ""]
    known = [s for s in samples if s is not None]
    low, high = stats.change_interval(known[: len(old)], known[len(old) :])
    verdict = "faster" if high < 1 else "slower" if low > 1 else "within chance"
    return [*cells, f"{low:.2f}-{high:.2f}", verdict]


def _samples(row: dict[str, Any], run: Document) -> stats.Run | None:
    series = row.get("series")
    samples = run.get("cases", {}).get(row["case"], {}).get("samples", {})
    if not series or any(name not in samples for name in series):
        return None
    return samples[series[0]], samples[series[1]]


def _ratios(rows: list[dict[str, Any]]) -> str:
    if len(rows) > 1 or rows[0].get("ratio_low") is None:
        return " / ".join(f"{r['ratio']:.2f}" for r in rows)
    (row,) = rows
    return f"{row['ratio']:.2f} ({row['ratio_low']:.2f}-{row['ratio_high']:.2f})"


def _numbers(rows: list[dict[str, Any]]) -> str:
    return " / ".join(_number(r) for r in rows)


def _number(row: dict[str, Any]) -> str:
    if row.get("value") is not None:
        return f"{row['value']:,.1f} {row['unit']}"
    p50 = f"p50 {row['median'] * 1000:.1f} ms"
    return p50 if row.get("p99") is None else f"{p50}, p99 {row['p99'] * 1000:.1f} ms"


def _header(side: str, path: Path, run: Document) -> str:
    machine = run.get("machine", {})
    load = machine.get("load_average")
    return (
        f"{side}: {path.name}: {run.get('started_at', '?')}, capsa at "
        f"{machine.get('capsa_commit', '?')}, {run.get('mode', '?')} run, load average "
        + (f"{load[0]:.2f}" if load else "?")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument(
        "--before", type=Path, nargs="+", required=True, help="runs' JSON (bench/results/)"
    )
    parser.add_argument("--after", type=Path, nargs="+", required=True, help="runs' JSON")
    args = parser.parse_args(argv)
    try:
        before = [load(path) for path in args.before]
        after = [load(path) for path in args.after]
    except NotARun as exc:
        print(f"python -m bench.compare: {exc}", file=sys.stderr)
        return 2
    for side, paths, runs in (("before", args.before, before), ("after", args.after, after)):
        for path, run in zip(paths, runs, strict=True):
            print(_header(side, path, run))
    print()
    print(markdown(COLUMNS, compare(before, after)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
