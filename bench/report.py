"""What a run found: rows of the table, raw samples, and the JSON file that keeps both."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench import stats

Verdict = Literal["met", "missed", "n/a"]


@dataclass(frozen=True)
class Target:
    """A bound on one number of a row: ``ratio``, ``p99``, ``value``..."""

    metric: Literal["ratio", "p99", "value"]
    op: Literal["<=", "<", ">="]
    bound: float
    text: str

    def verdict(self, row: Row) -> Verdict:
        value = getattr(row, self.metric)
        if value is None or math.isnan(value):
            return "n/a"
        ok = {
            "<=": value <= self.bound,
            "<": value < self.bound,
            ">=": value >= self.bound,
        }[self.op]
        return "met" if ok else "missed"


@dataclass
class Row:
    """One line of the table. Latencies in seconds (shown in ms); ``value`` is a single number
    (a rate, a size) in ``unit``."""

    case: str
    measure: str
    n: int
    median: float | None = None
    p95: float | None = None
    p99: float | None = None
    ref_median: float | None = None
    ref_p95: float | None = None
    ratio: float | None = None
    # The ratio's 95% bootstrap interval (stats.ratio_interval).
    ratio_low: float | None = None
    ratio_high: float | None = None
    # The two series of the case's samples that a ratio compares (capsa's side first).
    series: tuple[str, str] | None = None
    value: float | None = None
    unit: str = "ms"
    target: Target | None = None
    verdict: Verdict = "n/a"

    def judge(self, judged: bool) -> Row:
        if self.target is not None and judged:
            self.verdict = self.target.verdict(self)
        return self


def compared(
    case: str,
    measure: str,
    samples: dict[str, list[float]],
    series: tuple[str, str],
    target: Target | None = None,
) -> Row:
    """A row of two interleaved series of ``samples`` (capsa's side, then the reference's):
    medians, p95s and the ratio of medians, with its interval."""
    capsa, reference = samples[series[0]], samples[series[1]]
    ratio_low, ratio_high = stats.ratio_interval(capsa, reference)
    return Row(
        case=case,
        measure=measure,
        n=len(capsa),
        median=stats.median(capsa),
        p95=stats.p95(capsa),
        ref_median=stats.median(reference),
        ref_p95=stats.p95(reference),
        ratio=stats.ratio_of_medians(capsa, reference),
        ratio_low=ratio_low,
        ratio_high=ratio_high,
        series=series,
        target=target,
    )


def latencies(case: str, measure: str, samples: list[float], target: Target | None = None) -> Row:
    return Row(
        case=case,
        measure=measure,
        n=len(samples),
        median=stats.median(samples),
        p95=stats.p95(samples),
        p99=stats.p99(samples),
        target=target,
    )


def single(
    case: str, measure: str, value: float, unit: str, n: int = 1, target: Target | None = None
) -> Row:
    return Row(case=case, measure=measure, n=n, value=value, unit=unit, target=target)


@dataclass
class CaseResult:
    name: str
    rows: list[Row] = field(default_factory=list)
    # Raw samples by series name ("capsa.start", "reference.start", ...), seconds or MiB.
    samples: dict[str, list[float]] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Further measurements that explain the rows (phases, breakdowns).
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


_COLUMNS = (
    "case",
    "measure",
    "n",
    "capsa p50",
    "capsa p95",
    "capsa p99",
    "ref p50",
    "ref p95",
    "ratio",
    "ratio 95% CI",
    "target",
    "result",
)


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000:.1f} ms"


def _cells(row: Row) -> list[str]:
    first = f"{row.value:,.1f} {row.unit}" if row.value is not None else _ms(row.median)
    return [
        row.case,
        row.measure,
        str(row.n),
        first,
        _ms(row.p95),
        _ms(row.p99),
        _ms(row.ref_median),
        _ms(row.ref_p95),
        "" if row.ratio is None else f"{row.ratio:.2f}",
        "" if row.ratio_low is None else f"{row.ratio_low:.2f}-{row.ratio_high:.2f}",
        "" if row.target is None else row.target.text,
        "" if row.target is None else row.verdict,
    ]


def table(results: list[CaseResult]) -> str:
    """One Markdown table of every row (and of every case that failed)."""
    lines: list[list[str]] = []
    for result in results:
        if result.error is not None:
            reason = result.error.strip().splitlines()[-1]
            lines.append([result.name, f"FAILED: {reason}"] + [""] * (len(_COLUMNS) - 2))
        lines.extend(_cells(row) for row in result.rows)
    return markdown(_COLUMNS, lines)


def within_chance(results: list[CaseResult]) -> list[str]:
    """One line per judged row whose ratio's interval holds its target's bound: its verdict is
    this run's, and another run may well give the other."""
    return [
        f"{row.case} {row.measure}: {row.verdict} at {row.ratio:.2f}, but its interval "
        f"{row.ratio_low:.2f}-{row.ratio_high:.2f} holds the bound {row.target.bound:g}: "
        "another run may give the other verdict"
        for result in results
        for row in result.rows
        if row.target is not None
        and row.target.metric == "ratio"
        and row.verdict != "n/a"
        and row.ratio is not None
        and row.ratio_low is not None
        and row.ratio_high is not None
        and row.ratio_low <= row.target.bound <= row.ratio_high
    ]


def markdown(columns: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """A Markdown table, its columns padded to their widest cell."""
    widths = [max([len(c), *(len(line[i]) for line in lines)]) for i, c in enumerate(columns)]

    def render(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [render(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [render(line) for line in lines]
    return "\n".join(out)


def write_json(path: Path, header: dict[str, Any], results: list[CaseResult]) -> None:
    """The run's summary (every row) and its raw samples, in one file."""
    document = {
        **header,
        "summary": [
            {**asdict(row), "target": row.target.text if row.target else None}
            for result in results
            for row in result.rows
        ],
        "cases": {
            result.name: {k: v for k, v in asdict(result).items() if k != "rows"}
            for result in results
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")
