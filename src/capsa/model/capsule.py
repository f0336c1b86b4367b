"""Capsules and their containers: what a tenant asked for (specs) and what capsa observed (records).

A capsule is a pod: one network identity (a port), init containers that run one by one to
completion, then containers that run side by side. Specs are immutable once created; records carry
the status that the compute agent observes on the runtime.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class Status(StrEnum):
    """Zun's status vocabulary, shared by capsules and their containers."""

    CREATING = "Creating"
    CREATED = "Created"
    RUNNING = "Running"
    STOPPED = "Stopped"
    RESTARTING = "Restarting"
    DELETING = "Deleting"
    ERROR = "Error"
    UNKNOWN = "Unknown"


class TaskState(StrEnum):
    """The verb in progress, shown as task_state while the agent works on a capsule."""

    SCHEDULING = "scheduling"
    NETWORK_ATTACHING = "network_attaching"
    IMAGE_PULLING = "image_pulling"
    CONTAINER_CREATING = "container_creating"
    CONTAINER_STARTING = "container_starting"
    CONTAINER_DELETING = "container_deleting"
    # What a single container's actions ask of the agent (POST /v1/containers/{id}/<action>).
    CONTAINER_STOPPING = "container_stopping"
    CONTAINER_REBOOTING = "container_rebooting"
    CONTAINER_KILLING = "container_killing"


class DesiredState(StrEnum):
    """What the tenant wants; the scheduler and agents converge the runtime towards it."""

    RUNNING = "running"
    # A single container created without running it, or stopped: its sandbox (and so its
    # address) stays, its container is created but not running.
    STOPPED = "stopped"
    DELETED = "deleted"


class RestartPolicy(StrEnum):
    """Zun's names; templates say Always, OnFailure and Never."""

    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "no"
    # Docker's and Zun's; a stop is desired state here, which no restart undoes: as always.
    UNLESS_STOPPED = "unless-stopped"

    def restarts(self, exit_code: int) -> bool:
        """Whether a container that exited with ``exit_code`` is started again."""
        if self in (RestartPolicy.ALWAYS, RestartPolicy.UNLESS_STOPPED):
            return True
        return self is RestartPolicy.ON_FAILURE and exit_code != 0


class PullPolicy(StrEnum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


class CapsuleKind(StrEnum):
    """A capsule of ``/v1/capsules``, or a single container of ``/v1/containers``: a capsule of
    one container, run the way Zun's CRI integration runs one (a sandbox holding it)."""

    CAPSULE = "capsule"
    CONTAINER = "container"


class ContainerKind(StrEnum):
    INIT = "init"
    APP = "app"


@dataclass(frozen=True)
class PortSpec:
    container_port: int
    protocol: str = "TCP"
    host_port: int | None = None
    name: str | None = None


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    # Requests are claimed on the host and applied as the container's limits, as in Zun.
    cpu_millis: int
    memory_mb: int
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    workdir: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    image_pull_policy: PullPolicy = PullPolicy.IF_NOT_PRESENT
    tty: bool = False
    stdin: bool = False
    ports: tuple[PortSpec, ...] = ()
    # The private registry whose credentials pull the image (capsa.model.registry), if any.
    registry_id: str | None = None
    # All devices and capabilities of the host, no seccomp or AppArmor: only in projects an admin
    # allowed (capsa project set --allow-privileged).
    privileged: bool = False


@dataclass(frozen=True)
class CapsuleSpec:
    name: str
    containers: tuple[ContainerSpec, ...]
    init_containers: tuple[ContainerSpec, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    restart_policy: RestartPolicy = RestartPolicy.ALWAYS
    # CRI runtime handler; None means the host's default.
    runtime: str | None = None
    kind: CapsuleKind = CapsuleKind.CAPSULE
    # The sandbox's hostname; None: one made from the name.
    hostname: str | None = None
    # Restarts on-failure allows at most (Zun's MaximumRetryCount); 0: no limit.
    max_retries: int = 0
    # Deleted once it has exited for good (Zun's auto_remove).
    auto_remove: bool = False

    @property
    def cpu_millis(self) -> int:
        """What the capsule needs at its peak: init containers run alone, before the others."""
        running = sum(c.cpu_millis for c in self.containers)
        return max([running, *(c.cpu_millis for c in self.init_containers)])

    @property
    def memory_mb(self) -> int:
        running = sum(c.memory_mb for c in self.containers)
        return max([running, *(c.memory_mb for c in self.init_containers)])

    def restarts(self, exit_code: int, restart_count: int) -> bool:
        """Whether a container that exited with ``exit_code`` after ``restart_count`` restarts is
        started again: as the restart policy says, on-failure at most ``max_retries`` times."""
        if not self.restart_policy.restarts(exit_code):
            return False
        limited = self.restart_policy is RestartPolicy.ON_FAILURE and self.max_retries > 0
        return not limited or restart_count < self.max_retries

    @property
    def sandbox_hostname(self) -> str:
        """The hostname of its sandbox: the one asked for, else a DNS label made from the name
        (lowercase letters, digits and '-', at most 63)."""
        if self.hostname:
            return self.hostname
        label = re.sub(r"[^a-z0-9-]+", "-", self.name.lower()).strip("-")[:63].strip("-")
        return label or "capsule"

    @property
    def privileged(self) -> bool:
        """Whether a container of the capsule is privileged (its sandbox must be too)."""
        return any(c.privileged for c in (*self.init_containers, *self.containers))


@dataclass
class Container:
    uuid: str
    capsule_uuid: str
    project_id: str
    user_id: str
    kind: ContainerKind
    position: int
    spec: ContainerSpec
    status: Status = Status.CREATING
    status_reason: str | None = None
    task_state: TaskState | None = None
    cri_container_id: str | None = None
    restart_count: int = 0
    exit_code: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True)
class Address:
    """One address of a capsule, from its port."""

    network_id: str
    subnet_id: str
    port_id: str
    ip: str
    mac: str
    version: int = 4


@dataclass
class Capsule:
    uuid: str
    project_id: str
    user_id: str
    spec: CapsuleSpec
    status: Status = Status.CREATING
    status_reason: str | None = None
    task_state: TaskState | None = TaskState.SCHEDULING
    desired_state: DesiredState = DesiredState.RUNNING
    host: str | None = None
    sandbox_id: str | None = None
    # Raised by each start and reboot the tenant asks for: containers the agent started for an
    # older one are replaced (stopped first if they run).
    generation: int = 0
    # Seconds a stop or reboot gives the container before SIGKILL; None: agent.stop_grace_period.
    stop_timeout: int | None = None
    # A signal the tenant asked to send (kill), until the agent has sent it.
    pending_signal: str | None = None
    containers: list[Container] = field(default_factory=list)
    init_containers: list[Container] = field(default_factory=list)
    addresses: list[Address] = field(default_factory=list)
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def all_containers(self) -> list[Container]:
        """Init containers first, in their order, then the containers."""
        return [*self.init_containers, *self.containers]
