"""What a result depends on besides capsa: the machine, its load, and capsa's commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

_TIMEOUT = 10.0


def _output(*argv: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=_TIMEOUT, check=True, cwd=cwd
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    return done.stdout.strip()


def describe(repo: Path) -> dict[str, Any]:
    """Cores, kernel, containerd and Python versions, load, and the commit measured."""
    commit = _output("git", "rev-parse", "--short", "HEAD", cwd=repo)
    dirty = _output("git", "status", "--porcelain", "--", "src", cwd=repo)
    return {
        "cores": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "containerd": _output("containerd", "--version"),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
        "capsa_commit": commit + ("-dirty" if dirty else ""),
    }
