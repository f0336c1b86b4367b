"""Hosts that run capsules, and what the scheduler may place on them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum


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


@dataclass(frozen=True)
class PlacementRequest:
    """What the scheduler needs of a capsule that waits for a host."""

    capsule_uuid: str
    cpu_millis: int
    memory_mb: int
    # None: any host, on its default runtime.
    runtime: str | None


@dataclass(frozen=True)
class Claim:
    """A capsule's resources taken on a host."""

    capsule_uuid: str
    host: str
    cpu_millis: int
    memory_mb: int


class ClaimOutcome(Enum):
    PLACED = "placed"
    # The host's free room (as the database has it) is smaller than the claim.
    NO_ROOM = "no room"
    # The capsule was placed elsewhere or deleted meanwhile.
    CAPSULE_GONE = "capsule gone"
