"""Quotas: how much a project may hold, in Zun's four resources.

``containers`` counts a project's capsules (and, once they exist, its single containers), ``cpu``
is in cores, ``memory`` in MiB and ``disk`` in GB; -1 means unlimited. A project's limit of a
resource is its own, else the ``default`` quota class's, else the configured default, as in Zun.

What a project uses is counted from what it holds (a capsule counts until its records are
removed, Deleting and Error included), never kept as a separate counter that could drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

UNLIMITED = -1
DEFAULT_CLASS = "default"


class QuotaResource(StrEnum):
    CONTAINERS = "containers"
    CPU = "cpu"
    MEMORY = "memory"
    DISK = "disk"


@dataclass(frozen=True)
class QuotaLimits:
    """A limit per resource: containers, cpu cores, memory MiB, disk GB; -1 is unlimited."""

    containers: int = UNLIMITED
    cpu: int = UNLIMITED
    memory: int = UNLIMITED
    disk: int = UNLIMITED

    def of(self, resource: QuotaResource) -> int:
        limit: int = getattr(self, resource.value)
        return limit

    def as_dict(self) -> dict[str, int]:
        return {r.value: self.of(r) for r in QuotaResource}


NO_LIMITS = QuotaLimits()


@dataclass(frozen=True)
class QuotaUsage:
    """What a project holds, or what a request adds; cpu in millicores so that sums are exact."""

    containers: int = 0
    cpu_millis: int = 0
    memory_mb: int = 0
    disk_gb: int = 0

    def amount(self, resource: QuotaResource) -> int:
        """The amount of ``resource``, in its limit's unit times :func:`scale`."""
        return {
            QuotaResource.CONTAINERS: self.containers,
            QuotaResource.CPU: self.cpu_millis,
            QuotaResource.MEMORY: self.memory_mb,
            QuotaResource.DISK: self.disk_gb,
        }[resource]

    def in_limit_units(self, resource: QuotaResource) -> int | float:
        """The amount in the unit of its limit (cpu in cores), as Zun shows it."""
        amount = self.amount(resource)
        return amount / 1000 if resource is QuotaResource.CPU else amount


def scale(resource: QuotaResource) -> int:
    """Units of :meth:`QuotaUsage.amount` per unit of limit: cpu is counted in millicores."""
    return 1000 if resource is QuotaResource.CPU else 1


@dataclass(frozen=True)
class QuotaExcess:
    """A resource that a request would take beyond its limit."""

    resource: QuotaResource
    limit: int
    in_use: int | float
    requested: int | float


def exceeded(limits: QuotaLimits, in_use: QuotaUsage, request: QuotaUsage) -> list[QuotaExcess]:
    """The resources that ``request`` would take past their limits, in Zun's order."""
    excesses = []
    for resource in QuotaResource:
        limit = limits.of(resource)
        wanted = request.amount(resource)
        # Only what the request adds can break a limit: a request that adds nothing of a
        # resource passes even where the project is over (a limit lowered meanwhile).
        if (
            limit != UNLIMITED
            and wanted > 0
            and in_use.amount(resource) + wanted > limit * scale(resource)
        ):
            excesses.append(
                QuotaExcess(
                    resource,
                    limit,
                    in_use.in_limit_units(resource),
                    request.in_limit_units(resource),
                )
            )
    return excesses
