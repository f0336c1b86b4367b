"""What this host can offer to the scheduler."""

from __future__ import annotations

import os
from pathlib import Path


def memory_total_mb(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError(f"{meminfo} has no MemTotal line")


def schedulable_capacity(
    cpu_allocation_ratio: float, memory_allocation_ratio: float, reserved_memory_mb: int
) -> tuple[int, int]:
    """(cpu millicores, memory MiB) that claims may take on this host."""
    cores = len(os.sched_getaffinity(0))
    cpu_millis = int(cores * 1000 * cpu_allocation_ratio)
    memory_mb = int(max(0, memory_total_mb() - reserved_memory_mb) * memory_allocation_ratio)
    return cpu_millis, memory_mb
