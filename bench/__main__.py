"""``python -m bench [--smoke] [--only CASE ...] [--rounds N] [--results-dir DIR]``: capsa's
benchmark suite (bench/README.md). Prints one table and writes the raw samples and the summary
as JSON; exits 1 when a case failed, 130 when interrupted (after removing everything)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from bench import machine, phases, tracing
from bench.cases import api, burst, cni, memory, scheduler, start
from bench.instance import REPO_ROOT
from bench.report import CaseResult, table, within_chance, write_json
from bench.suite import CASES, PAIRED_CASES, Plan, Session

RUNNERS: dict[str, Callable[[Session], CaseResult]] = {
    "start": start.run,
    "burst": burst.run,
    "cni": cni.run,
    "api": api.run,
    "scheduler": scheduler.run,
    "memory": memory.run,
}
DEFAULT_RESULTS_DIR = REPO_ROOT / "bench" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny counts, to check the suite")
    parser.add_argument("--only", nargs="+", choices=CASES, metavar="CASE", help=", ".join(CASES))
    parser.add_argument(
        "--rounds", type=int, help="measured rounds of the start, burst and cni comparisons"
    )
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument(
        "--trace",
        action="store_true",
        help="time every call of the paired capsa (profiling; slows capsa a little)",
    )
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


# Signals received: a case whose clean-up fails after an interrupt must not let the run go on.
_SIGNALLED: list[str] = []


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    # SIGINT and SIGTERM unwind the same way, so that everything is removed on the way out.
    _SIGNALLED.append(signal.Signals(signum).name)
    raise KeyboardInterrupt(_SIGNALLED[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("the benchmarks need root (containerd, netns, veths, cgroups)", file=sys.stderr)
        return 2
    plan = Plan.smoke_plan() if args.smoke else Plan()
    if args.rounds is not None:
        plan = plan.with_rounds(args.rounds)
    selected = [c for c in CASES if not args.only or c in args.only]
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    started = datetime.now(UTC)
    header: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "mode": "smoke" if plan.smoke else "full",
        "traced": args.trace,
        "plan": plan.__dict__,
        "machine": machine.describe(REPO_ROOT),
    }
    results: list[CaseResult] = []
    interrupted = False
    session = Session(plan, trace=args.trace)
    header["workspace"] = str(session.workspace.root)
    try:
        for name in selected:
            print(f"== {name}", file=sys.stderr, flush=True)
            began = time.monotonic()
            try:
                result = RUNNERS[name](session)
            except Exception:
                if _SIGNALLED:
                    raise KeyboardInterrupt(_SIGNALLED[-1]) from None
                result = CaseResult(name, error=traceback.format_exc())
                print(result.error, file=sys.stderr)
            result.seconds = round(time.monotonic() - began, 1)
            results.append(result)
            if name in PAIRED_CASES and not any(c in PAIRED_CASES for c in _after(selected, name)):
                session.close_paired()
    except KeyboardInterrupt as exc:
        interrupted = True
        cut_short = selected[len(results)] if len(results) < len(selected) else "clean-up"
        results.append(CaseResult(cut_short, error=f"interrupted ({exc or 'SIGINT'})"))
        print("interrupted: stopping and removing what the run made", file=sys.stderr)
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if session.trace_path is not None and session.trace_path.exists():
            args.results_dir.mkdir(parents=True, exist_ok=True)
            kept = args.results_dir / f"{_stem(started, plan)}-trace.jsonl"
            shutil.copyfile(session.trace_path, kept)
            header["trace"] = str(kept)
        session.close()
    for result in results:
        for row in result.rows:
            row.judge(judged=not plan.smoke)
    header["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    header["load_average_at_end"] = os.getloadavg()
    header["interrupted"] = interrupted
    path = args.results_dir / f"{_stem(started, plan)}.json"
    write_json(path, header, results)
    print(table(results))
    undecided = within_chance(results)
    if undecided:
        print("\nVerdicts within chance:\n" + "\n".join(f"- {line}" for line in undecided))
    for result in results:
        for title, key in (("start", "start_steps"), ("teardown", "teardown_steps")):
            if result.details.get(key):
                print("\n" + phases.render(f"{result.name}: {title}", result.details[key]))
        cpu = result.details.get("cpu_ms_per_round")
        if cpu:
            each = ", ".join(f"{series} {ms:.0f} ms" for series, ms in cpu.items())
            print(f"\n{result.name}: CPU per round, teardown included (median): {each}")
        calls = result.details.get("reference_calls_median_ms")
        if calls:
            each = ", ".join(f"{method} {ms:.1f} ms" for method, ms in calls.items())
            print(f"\n{result.name}: the reference's CRI calls (median): {each}")
        daemon = cni.daemon_time_line(result.details)
        if daemon:
            print(f"\n{result.name}: {daemon}")
        trace = result.details.get("trace")
        if trace:
            for phase in ("start", "teardown"):
                title = f"{result.name}: {phase}"
                print("\n" + tracing.render_summary(title, trace[f"{phase}_calls"]))
                print(f"\n{title}, the median round call by call:\n{trace[f'{phase}_timeline']}")
    print(f"\nresults: {path}")
    if interrupted:
        return 130
    return 1 if any(r.error for r in results) else 0


def _stem(started: datetime, plan: Plan) -> str:
    return f"bench-{started:%Y%m%dT%H%M%SZ}-{'smoke' if plan.smoke else 'full'}"


def _after(selected: list[str], name: str) -> list[str]:
    return selected[selected.index(name) + 1 :]


if __name__ == "__main__":
    sys.exit(main())
