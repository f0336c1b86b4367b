"""Plain values for what capsa asks of a CRI runtime and what it answers.

These are the only CRI types the rest of capsa sees: no protobuf message leaves the cri package.
Times are nanoseconds since the epoch, as CRI reports them (0 when not yet known).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class SandboxState(enum.Enum):
    READY = "ready"
    NOT_READY = "not_ready"


class ContainerState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    UNKNOWN = "unknown"


class Protocol(enum.Enum):
    TCP = "tcp"
    UDP = "udp"
    SCTP = "sctp"


@dataclass(frozen=True)
class PortMapping:
    container_port: int
    host_port: int = 0
    protocol: Protocol = Protocol.TCP
    host_ip: str = ""


@dataclass(frozen=True)
class Mount:
    container_path: str
    host_path: str
    readonly: bool = False


@dataclass(frozen=True)
class SandboxSpec:
    """What RunPodSandbox needs: CRI's PodSandboxConfig, trimmed to what capsa sets."""

    name: str
    namespace: str
    uid: str
    attempt: int = 0
    # Must stay empty for a host-network sandbox (the runtime refuses a hostname then).
    hostname: str = ""
    # Container log paths are relative to this directory.
    log_directory: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    # Empty means the runtime's default handler.
    runtime_handler: str = ""
    cgroup_parent: str = ""
    host_network: bool = False
    # Needed by containerd for any privileged container in the sandbox.
    privileged: bool = False
    port_mappings: tuple[PortMapping, ...] = ()
    dns_servers: tuple[str, ...] = ()
    dns_searches: tuple[str, ...] = ()
    dns_options: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContainerSpec:
    """What CreateContainer needs: CRI's ContainerConfig, trimmed to what capsa sets."""

    name: str
    image: str
    attempt: int = 0
    # Replaces the image's entrypoint; empty keeps it.
    command: tuple[str, ...] = ()
    # Replaces the image's cmd; empty keeps it.
    args: tuple[str, ...] = ()
    working_dir: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    # Relative to the sandbox's log_directory.
    log_path: str = ""
    tty: bool = False
    stdin: bool = False
    # Every host device and capability, no seccomp or AppArmor profile.
    privileged: bool = False
    # 0 leaves a limit unset.
    cpu_period: int = 0
    cpu_quota: int = 0
    cpu_shares: int = 0
    memory_limit_bytes: int = 0


@dataclass(frozen=True)
class ImageAuth:
    """Credentials for a private registry: username and password, or ``auth`` (base64 user:pass)."""

    username: str = ""
    password: str = field(default="", repr=False)
    auth: str = field(default="", repr=False)
    server_address: str = ""
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)


@dataclass(frozen=True)
class RuntimeVersion:
    version: str
    runtime_name: str
    runtime_version: str
    runtime_api_version: str


@dataclass(frozen=True)
class RuntimeCondition:
    type: str
    status: bool
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class RuntimeStatus:
    conditions: tuple[RuntimeCondition, ...]

    def condition(self, type_: str) -> RuntimeCondition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    @property
    def runtime_ready(self) -> bool:
        cond = self.condition("RuntimeReady")
        return cond is not None and cond.status

    @property
    def network_ready(self) -> bool:
        cond = self.condition("NetworkReady")
        return cond is not None and cond.status


@dataclass(frozen=True)
class PodSandbox:
    id: str
    name: str
    namespace: str
    uid: str
    attempt: int
    state: SandboxState
    created_at: int
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    runtime_handler: str


@dataclass(frozen=True)
class SandboxStatus:
    id: str
    name: str
    namespace: str
    uid: str
    attempt: int
    state: SandboxState
    created_at: int
    # The pod's IP (of the CNI result's eth0); empty for host network or before networking.
    ip: str
    additional_ips: tuple[str, ...]
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    runtime_handler: str


@dataclass(frozen=True)
class Container:
    id: str
    sandbox_id: str
    name: str
    attempt: int
    image: str
    image_ref: str
    state: ContainerState
    created_at: int
    labels: Mapping[str, str]
    annotations: Mapping[str, str]


@dataclass(frozen=True)
class ContainerStatus:
    id: str
    name: str
    attempt: int
    state: ContainerState
    created_at: int
    started_at: int
    finished_at: int
    exit_code: int
    reason: str
    message: str
    image: str
    image_ref: str
    # Absolute: the sandbox's log_directory joined with the container's log_path.
    log_path: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]


@dataclass(frozen=True)
class ContainerStats:
    container_id: str
    # Nanoseconds of CPU time used since the container started.
    cpu_usage_core_ns: int
    memory_working_set_bytes: int
    memory_usage_bytes: int
    writable_layer_bytes: int


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class Image:
    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int
