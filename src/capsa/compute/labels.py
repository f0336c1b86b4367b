"""Labels capsa puts on every CRI sandbox and container, so it finds them again after a restart.

The runtime is the truth about what exists: the agent never relies on memory or on ids it recorded
to know which sandbox or container belongs to which capsule.
"""

from __future__ import annotations

from collections.abc import Mapping

MANAGED = "io.capsa.managed"
CAPSULE = "io.capsa.capsule"
CONTAINER = "io.capsa.container"
PROJECT = "io.capsa.project"
KIND = "io.capsa.kind"
# The capsule generation (start or reboot asked by the tenant) a container was started for.
GENERATION = "io.capsa.generation"

MANAGED_SELECTOR = {MANAGED: "true"}


def capsule_selector(capsule_uuid: str) -> dict[str, str]:
    return {MANAGED: "true", CAPSULE: capsule_uuid}


def container_selector(container_uuid: str) -> dict[str, str]:
    return {MANAGED: "true", CONTAINER: container_uuid}


def generation(container_labels: Mapping[str, str]) -> int:
    """The capsule generation a container was started for (0: one from before generations)."""
    value = container_labels.get(GENERATION, "0")
    return int(value) if value.isdigit() else 0
