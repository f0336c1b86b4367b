"""bench.compare: two runs' JSON, row by row, with the change's interval."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from bench import compare
from bench.report import CaseResult, compared, single, write_json


def run(path: Path, capsa_scale: float, seed: int, extra_row: bool = False) -> Path:
    """A run's JSON as `python -m bench` writes it: a start case of 20 interleaved rounds and
    a scheduler rate."""
    rng = random.Random(seed)
    load = [rng.uniform(0.9, 1.3) for _ in range(20)]
    samples = {
        "capsa.start": [0.1 * capsa_scale * x * rng.uniform(0.97, 1.03) for x in load],
        "reference.start": [0.1 * x * rng.uniform(0.97, 1.03) for x in load],
    }
    start = CaseResult("start", samples=samples)
    start.rows = [compared("start", "POST -> Running", samples, ("capsa.start", "reference.start"))]
    scheduler = CaseResult("scheduler", rows=[single("scheduler", "placements", 9000.0, "/s")])
    if extra_row:
        scheduler.rows.append(single("scheduler", "only in this run", 1.0, "/s"))
    write_json(
        path, {"started_at": f"run {seed}", "machine": {"capsa_commit": "abc"}}, [start, scheduler]
    )
    return path


def lines_of(before: Path | list[Path], after: Path | list[Path]) -> list[list[str]]:
    def runs(paths: Path | list[Path]) -> list[dict[str, Any]]:
        return [compare.load(p) for p in (paths if isinstance(paths, list) else [paths])]

    return compare.compare(runs(before), runs(after))


def test_a_faster_run_is_told_apart_from_chance(tmp_path: Path) -> None:
    before = run(tmp_path / "before.json", 1.3, seed=1)
    after = run(tmp_path / "after.json", 1.1, seed=2)
    [start, scheduler] = lines_of(before, after)
    assert start[:2] == ["start", "POST -> Running"]
    low, high = (float(x) for x in start[5].split("-"))
    assert low < 1.1 / 1.3 < high < 1
    assert start[6] == "faster"
    assert lines_of(after, before)[0][6] == "slower"
    assert scheduler == ["scheduler", "placements", "9,000.0 /s", "9,000.0 /s", "", "", ""]


def test_two_runs_of_the_same_code_differ_within_chance(tmp_path: Path) -> None:
    before = run(tmp_path / "before.json", 1.2, seed=3)
    after = run(tmp_path / "after.json", 1.2, seed=4)
    [start, _] = lines_of(before, after)
    low, high = (float(x) for x in start[5].split("-"))
    assert low < 1 < high
    assert start[6] == "within chance"


def test_several_runs_a_side_widen_the_interval_by_how_much_runs_differ(tmp_path: Path) -> None:
    # The machine's speed drifts between runs: each run is sure of its own ratio, but runs of
    # the same code disagree by more than the after side's 4% (which each run's rounds alone
    # would call slower).
    before = [run(tmp_path / f"b{i}.json", s, seed=20 + i) for i, s in enumerate((1.1, 1.3))]
    after = [run(tmp_path / f"a{i}.json", s, seed=30 + i) for i, s in enumerate((1.16, 1.34))]
    [start, _] = lines_of(before, after)
    assert start[2].count(" / ") == 1 and start[3].count(" / ") == 1
    assert float(start[4]) == pytest.approx(1.25 / 1.2, abs=0.02)
    low, high = (float(x) for x in start[5].split("-"))
    assert low < 0.95 and high > 1.1
    assert start[6] == "within chance"


def test_rows_of_one_run_only_are_left_out(tmp_path: Path) -> None:
    before = run(tmp_path / "before.json", 1.2, seed=5)
    after = run(tmp_path / "after.json", 1.2, seed=6, extra_row=True)
    assert [line[1] for line in lines_of(before, after)] == ["POST -> Running", "placements"]


def test_a_run_whose_rows_name_no_series_gets_no_interval(tmp_path: Path) -> None:
    # Runs written before the rows named their series.
    before = run(tmp_path / "before.json", 1.2, seed=7)
    document: dict[str, Any] = json.loads(before.read_text())
    for row in document["summary"]:
        row.pop("series")
    before.write_text(json.dumps(document))
    [start, _] = lines_of(before, run(tmp_path / "after.json", 1.2, seed=8))
    assert start[4] and start[5:] == ["", ""]


def test_a_file_that_is_no_run_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.json"
    other.write_text('{"cases": {}}')
    after = run(tmp_path / "after.json", 1.2, seed=9)
    assert compare.main(["--before", str(other), "--after", str(after)]) == 2
    assert "not the JSON of a `python -m bench` run" in capsys.readouterr().err
    assert compare.main(["--before", str(after), "--after", str(after)]) == 0
    assert "within chance" in capsys.readouterr().out
