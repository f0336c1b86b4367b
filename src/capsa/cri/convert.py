"""Conversions between capsa's CRI values (types.py) and the runtime.v1 protobuf messages."""

from __future__ import annotations

import json
from collections.abc import Mapping

from capsa.cri import types as t
from capsa.cri.proto import api_pb2 as pb

_SANDBOX_STATES = {
    pb.SANDBOX_READY: t.SandboxState.READY,
    pb.SANDBOX_NOTREADY: t.SandboxState.NOT_READY,
}
_CONTAINER_STATES = {
    pb.CONTAINER_CREATED: t.ContainerState.CREATED,
    pb.CONTAINER_RUNNING: t.ContainerState.RUNNING,
    pb.CONTAINER_EXITED: t.ContainerState.EXITED,
    pb.CONTAINER_UNKNOWN: t.ContainerState.UNKNOWN,
}
_CONTAINER_STATES_PB = {state: value for value, state in _CONTAINER_STATES.items()}
_PROTOCOLS_PB = {t.Protocol.TCP: pb.TCP, t.Protocol.UDP: pb.UDP, t.Protocol.SCTP: pb.SCTP}


def sandbox_config(spec: t.SandboxSpec) -> pb.PodSandboxConfig:
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(
            name=spec.name, uid=spec.uid, namespace=spec.namespace, attempt=spec.attempt
        ),
        hostname=spec.hostname,
        log_directory=spec.log_directory,
        port_mappings=[
            pb.PortMapping(
                protocol=_PROTOCOLS_PB[p.protocol],
                container_port=p.container_port,
                host_port=p.host_port,
                host_ip=p.host_ip,
            )
            for p in spec.port_mappings
        ],
        labels=spec.labels,
        annotations=spec.annotations,
        linux=pb.LinuxPodSandboxConfig(cgroup_parent=spec.cgroup_parent),
    )
    if spec.dns_servers or spec.dns_searches or spec.dns_options:
        config.dns_config.servers.extend(spec.dns_servers)
        config.dns_config.searches.extend(spec.dns_searches)
        config.dns_config.options.extend(spec.dns_options)
    if spec.host_network:
        config.linux.security_context.namespace_options.network = pb.NODE
    if spec.privileged:
        config.linux.security_context.privileged = True
    return config


def container_config(spec: t.ContainerSpec, sandbox: t.SandboxSpec) -> pb.ContainerConfig:
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=spec.name, attempt=spec.attempt),
        image=pb.ImageSpec(image=spec.image),
        command=spec.command,
        args=spec.args,
        working_dir=spec.working_dir,
        envs=[pb.KeyValue(key=k, value=v.encode()) for k, v in spec.env.items()],
        mounts=[
            pb.Mount(container_path=m.container_path, host_path=m.host_path, readonly=m.readonly)
            for m in spec.mounts
        ],
        labels=spec.labels,
        annotations=spec.annotations,
        log_path=spec.log_path,
        stdin=spec.stdin,
        tty=spec.tty,
    )
    if spec.cpu_period or spec.cpu_quota or spec.cpu_shares or spec.memory_limit_bytes:
        config.linux.resources.CopyFrom(
            linux_resources(
                spec.cpu_period, spec.cpu_quota, spec.cpu_shares, spec.memory_limit_bytes
            )
        )
    if sandbox.host_network:
        # The container must ask for the host network too, like the sandbox it joins.
        config.linux.security_context.namespace_options.network = pb.NODE
    if spec.privileged:
        config.linux.security_context.privileged = True
    return config


def linux_resources(
    cpu_period: int, cpu_quota: int, cpu_shares: int, memory_limit_bytes: int
) -> pb.LinuxContainerResources:
    return pb.LinuxContainerResources(
        cpu_period=cpu_period,
        cpu_quota=cpu_quota,
        cpu_shares=cpu_shares,
        memory_limit_in_bytes=memory_limit_bytes,
    )


def auth_config(auth: t.ImageAuth) -> pb.AuthConfig:
    return pb.AuthConfig(
        username=auth.username,
        password=auth.password,
        auth=auth.auth,
        server_address=auth.server_address,
        identity_token=auth.identity_token,
        registry_token=auth.registry_token,
    )


def sandbox_filter(sandbox_id: str, labels: Mapping[str, str] | None) -> pb.PodSandboxFilter:
    return pb.PodSandboxFilter(id=sandbox_id, label_selector=labels or {})


def container_filter(
    sandbox_id: str | None, labels: Mapping[str, str] | None, state: t.ContainerState | None
) -> pb.ContainerFilter:
    filter_ = pb.ContainerFilter(pod_sandbox_id=sandbox_id or "", label_selector=labels or {})
    if state is not None:
        filter_.state.state = _CONTAINER_STATES_PB[state]
    return filter_


def pod_sandbox(msg: pb.PodSandbox) -> t.PodSandbox:
    return t.PodSandbox(
        id=msg.id,
        name=msg.metadata.name,
        namespace=msg.metadata.namespace,
        uid=msg.metadata.uid,
        attempt=msg.metadata.attempt,
        state=_SANDBOX_STATES[msg.state],
        created_at=msg.created_at,
        labels=dict(msg.labels),
        annotations=dict(msg.annotations),
        runtime_handler=msg.runtime_handler,
    )


def sandbox_status(msg: pb.PodSandboxStatus) -> t.SandboxStatus:
    return t.SandboxStatus(
        id=msg.id,
        name=msg.metadata.name,
        namespace=msg.metadata.namespace,
        uid=msg.metadata.uid,
        attempt=msg.metadata.attempt,
        state=_SANDBOX_STATES[msg.state],
        created_at=msg.created_at,
        ip=msg.network.ip,
        additional_ips=tuple(ip.ip for ip in msg.network.additional_ips),
        labels=dict(msg.labels),
        annotations=dict(msg.annotations),
        runtime_handler=msg.runtime_handler,
    )


def container(msg: pb.Container) -> t.Container:
    return t.Container(
        id=msg.id,
        sandbox_id=msg.pod_sandbox_id,
        name=msg.metadata.name,
        attempt=msg.metadata.attempt,
        image=msg.image.image,
        image_ref=msg.image_ref,
        state=_CONTAINER_STATES[msg.state],
        created_at=msg.created_at,
        labels=dict(msg.labels),
        annotations=dict(msg.annotations),
    )


def container_status(msg: pb.ContainerStatus) -> t.ContainerStatus:
    return t.ContainerStatus(
        id=msg.id,
        name=msg.metadata.name,
        attempt=msg.metadata.attempt,
        state=_CONTAINER_STATES[msg.state],
        created_at=msg.created_at,
        started_at=msg.started_at,
        finished_at=msg.finished_at,
        exit_code=msg.exit_code,
        reason=msg.reason,
        message=msg.message,
        image=msg.image.image,
        image_ref=msg.image_ref,
        log_path=msg.log_path,
        labels=dict(msg.labels),
        annotations=dict(msg.annotations),
    )


def pid_from_info(info: Mapping[str, str]) -> int | None:
    """The ``pid`` of a verbose status' ``info`` document (containerd's JSON), if positive."""
    try:
        pid = json.loads(info.get("info", "{}")).get("pid")
    except (ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) and pid > 0 else None


def container_stats(msg: pb.ContainerStats) -> t.ContainerStats:
    return t.ContainerStats(
        container_id=msg.attributes.id,
        cpu_usage_core_ns=msg.cpu.usage_core_nano_seconds.value,
        memory_working_set_bytes=msg.memory.working_set_bytes.value,
        memory_usage_bytes=msg.memory.usage_bytes.value,
        writable_layer_bytes=msg.writable_layer.used_bytes.value,
    )


def image(msg: pb.Image) -> t.Image:
    return t.Image(
        id=msg.id,
        repo_tags=tuple(msg.repo_tags),
        repo_digests=tuple(msg.repo_digests),
        size=msg.size,
    )


def runtime_version(msg: pb.VersionResponse) -> t.RuntimeVersion:
    return t.RuntimeVersion(
        version=msg.version,
        runtime_name=msg.runtime_name,
        runtime_version=msg.runtime_version,
        runtime_api_version=msg.runtime_api_version,
    )


def runtime_status(msg: pb.StatusResponse) -> t.RuntimeStatus:
    return t.RuntimeStatus(
        conditions=tuple(
            t.RuntimeCondition(type=c.type, status=c.status, reason=c.reason, message=c.message)
            for c in msg.status.conditions
        )
    )
