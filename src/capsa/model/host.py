"""Hosts that run capsules, and what the scheduler may place on them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Host:
    name: str
    uuid: str
    # Where the API reaches this host's agent (logs).
    agent_url: str
    # Schedulable capacity (after allocation ratios and reservations) and what claims hold.
    cpu_millis: int
    memory_mb: int
    cpu_millis_used: int
    memory_mb_used: int
    runtimes: tuple[str, ...]
    disabled: bool
    heartbeat_at: datetime | None

    @property
    def default_runtime(self) -> str | None:
        return self.runtimes[0] if self.runtimes else None

    @property
    def cpu_millis_free(self) -> int:
        return self.cpu_millis - self.cpu_millis_used

    @property
    def memory_mb_free(self) -> int:
        return self.memory_mb - self.memory_mb_used
