"""Case 6: resident memory (VmRSS) of capsa all-in-one, as ``make up`` runs it: idle, and with
capsules running. capsa's own process, the containerd and registry it runs, and their sum; the
pods' shims are shown apart (one per pod, the runtime's cost rather than capsa's)."""

from __future__ import annotations

import time
from pathlib import Path

from bench import host, stats
from bench.cases.burst import start_at_once
from bench.instance import CapsaUp
from bench.report import CaseResult, Row, Target, single
from bench.suite import Session
from capsa.runtime.shims import shims_of

IDLE_TARGET = Target("value", "<", 150.0, "< 150 MB")
# Memory settles after start-up (imports done, first resync, first heartbeat).
_SETTLE_S = 3.0
_SAMPLES = 5
_SAMPLE_GAP_S = 0.2


def run(session: Session) -> CaseResult:
    plan = session.plan
    result = CaseResult("memory", parameters={"capsules": plan.memory_capsules})
    with session.standard_capsa("memory") as capsa:
        time.sleep(_SETTLE_S)
        idle = sample(capsa)
        start_at_once(capsa, plan.memory_capsules)
        time.sleep(_SETTLE_S)
        busy = sample(capsa)
    for label, found in (("idle", idle), (f"{plan.memory_capsules} capsules", busy)):
        for process, values in found.items():
            result.samples[f"{label}.{process}"] = values
        result.rows += _rows(label, found)
    result.notes = [
        "VmRSS from /proc/<pid>/status, median of "
        f"{_SAMPLES} samples {_SAMPLE_GAP_S:g} s apart, {_SETTLE_S:g} s after start-up "
        "and after the capsules are Running. RSS counts shared library pages in every process "
        "that maps them, so the sum overstates what the processes take together.",
    ]
    return result


def _rows(label: str, found: dict[str, list[float]]) -> list[Row]:
    medians = {process: stats.median(values) for process, values in found.items()}
    rows = [
        single("memory", f"{label}: {process}", medians[process], "MB", n=len(found[process]))
        for process in ("capsa", "containerd", "registry")
    ]
    total = medians["capsa"] + medians["containerd"] + medians["registry"]
    rows.append(
        single(
            "memory",
            f"{label}: capsa + containerd + registry",
            total,
            "MB",
            n=len(found["capsa"]),
            target=IDLE_TARGET if label == "idle" else None,
        )
    )
    if medians.get("shims"):
        rows.append(
            single(
                "memory",
                f"{label}: pod shims (all)",
                medians["shims"],
                "MB",
                n=len(found["shims"]),
            )
        )
    return rows


def sample(capsa: CapsaUp) -> dict[str, list[float]]:
    """RSS in MiB of capsa, its containerd and registry, and all pod shims, several times."""
    cfg = capsa.config
    pids = {
        "capsa": capsa.pid,
        "containerd": _pid(cfg.run_dir / "containerd.pid"),
        "registry": _pid(cfg.run_dir / "registry.pid"),
    }
    found: dict[str, list[float]] = {name: [] for name in (*pids, "shims")}
    for _ in range(_SAMPLES):
        for name, pid in pids.items():
            found[name].append(host.rss_mb(pid))
        found["shims"].append(sum(host.rss_mb(s.pid) for s in shims_of(cfg.cri_socket)))
        time.sleep(_SAMPLE_GAP_S)
    return found


def _pid(pidfile: Path) -> int:
    return int(pidfile.read_text().strip())
