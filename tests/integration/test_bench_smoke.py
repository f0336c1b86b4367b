"""The benchmark suite (bench/, `make bench`) in smoke mode: every case runs with tiny counts and
reports a table and a JSON file, and the run leaves nothing behind. No time is asserted: a smoke
run only proves that the suite still works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from capsa.cni.daemon import STEPS_AFTER_ANSWER

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# The six cases of the benchmark issue, and the rows each one must report.
EXPECTED_ROWS = {
    "start": 2,  # start, teardown
    "burst": 1,
    "cni": 3,  # ADD, DEL, the floor: the plugin's interpreter started and exited
    "api": 9,  # list and get, 1 and 8 clients, latency and throughput; a list of changed capsules
    "scheduler": 1,
    "memory": 9,  # capsa, containerd, registry and their sum, idle and busy; shims when busy
}
COMPARED_SERIES = {
    "start": ("start", "teardown"),
    "burst": ("burst",),
    "cni": ("add", "del"),
}


def run_smoke(results_dir: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--results-dir", str(results_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    files = list(results_dir.glob("bench-*-smoke.json"))
    assert len(files) == 1, (files, done.stdout, done.stderr[-4000:])
    return done, json.loads(files[0].read_text())


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in argv:
            found.append(argv)
    return found


def test_smoke_run_reports_every_case_and_leaves_nothing(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the benchmarks need root")

    done, document = run_smoke(tmp_path)

    assert done.returncode == 0, done.stderr[-4000:]
    assert document["mode"] == "smoke"
    assert not document["interrupted"]
    plan = document["plan"]
    cases = document["cases"]
    assert set(cases) == set(EXPECTED_ROWS)
    for name, case in cases.items():
        assert case["error"] is None, (name, case["error"])
    rows_by_case: dict[str, list[dict[str, Any]]] = {}
    for row in document["summary"]:
        rows_by_case.setdefault(row["case"], []).append(row)
    assert {name: len(rows) for name, rows in rows_by_case.items()} == EXPECTED_ROWS

    for name, series in COMPARED_SERIES.items():
        for measure in series:
            for side in ("capsa", "reference"):
                samples = cases[name]["samples"][f"{side}.{measure}"]
                assert len(samples) == plan[f"{name}_rounds"], (name, side, measure)
                assert all(s > 0 for s in samples)
    for row in document["summary"]:
        if row["case"] in COMPARED_SERIES:
            assert row["ratio"] > 0, row
            assert row["ratio_low"] <= row["ratio"] <= row["ratio_high"], row
            assert row["median"] > 0 and row["ref_median"] > 0, row
        else:
            assert (row["value"] or row["median"]) > 0, row
        # Smoke counts are too small to judge a target.
        assert row["verdict"] == "n/a", row
    assert len(cases["cni"]["samples"]["interpreter.start"]) == plan["cni_rounds"]
    # The daemon's own time per call is below the whole call's, seen from the plugin's caller.
    daemon = cases["cni"]["details"]["daemon_mean_ms"]
    assert set(daemon) == {"ADD", "DEL"}, daemon
    whole_add_ms = min(cases["cni"]["samples"]["capsa.add"]) * 1000
    assert 0 < daemon["ADD"] < whole_add_ms, (daemon, whole_add_ms)
    # Its steps, per call, within its time but those after its answer.
    steps = cases["cni"]["details"]["daemon_steps_mean_ms"]
    # (An ADD that came before the firewall enforced its port has a wait too.)
    assert {"lookup", "plug", "record"} <= set(steps["ADD"]) <= {"lookup", "plug", "record", "wait"}
    assert set(steps["DEL"]) == {"detach", "unbind"}, steps
    for command, ms in daemon.items():
        answered = [
            t for step, t in steps[command].items() if (command, step) not in STEPS_AFTER_ANSWER
        ]
        assert 0 < sum(answered) < ms, (command, steps, ms)
    assert len(cases["api"]["samples"]["list.1"]) == plan["api_list_requests"]
    assert len(cases["api"]["samples"]["get.8"]) == plan["api_get_requests"]
    assert cases["scheduler"]["parameters"]["placements"] == plan["scheduler_placements"]

    table = done.stdout
    header = table.splitlines()[0]
    assert header.startswith("| case") and "ratio" in header and "result" in header, header
    for row in document["summary"]:
        assert row["measure"] in table, row["measure"]

    workspace = document["workspace"]
    assert not Path(workspace).exists()
    assert processes_mentioning(workspace) == []
