from __future__ import annotations

from capsa.cri import convert
from capsa.cri import types as t
from capsa.cri.proto import api_pb2 as pb

SANDBOX = t.SandboxSpec(
    name="web",
    namespace="proj",
    uid="uid-1",
    attempt=2,
    hostname="web-host",
    log_directory="/var/log/pods/uid-1",
    labels={"capsa.capsule": "c1"},
    annotations={"note": "x"},
    runtime_handler="crun",
    cgroup_parent="/capsa",
    port_mappings=(
        t.PortMapping(container_port=80, host_port=8080),
        t.PortMapping(container_port=53, protocol=t.Protocol.UDP, host_ip="127.0.0.1"),
    ),
    dns_servers=("10.0.0.2",),
    dns_searches=("svc.local",),
)


def test_sandbox_config() -> None:
    config = convert.sandbox_config(SANDBOX)
    assert (config.metadata.name, config.metadata.namespace) == ("web", "proj")
    assert (config.metadata.uid, config.metadata.attempt) == ("uid-1", 2)
    assert config.hostname == "web-host"
    assert config.log_directory == "/var/log/pods/uid-1"
    assert dict(config.labels) == {"capsa.capsule": "c1"}
    assert dict(config.annotations) == {"note": "x"}
    assert config.linux.cgroup_parent == "/capsa"
    assert [
        (p.container_port, p.host_port, p.protocol, p.host_ip) for p in config.port_mappings
    ] == [
        (80, 8080, pb.TCP, ""),
        (53, 0, pb.UDP, "127.0.0.1"),
    ]
    assert list(config.dns_config.servers) == ["10.0.0.2"]
    assert list(config.dns_config.searches) == ["svc.local"]
    # The pod's own network namespace unless asked otherwise.
    assert config.linux.security_context.namespace_options.network == pb.POD


def test_host_network_sandbox_and_its_containers() -> None:
    sandbox = t.SandboxSpec(name="n", namespace="ns", uid="u", host_network=True)
    config = convert.sandbox_config(sandbox)
    assert config.linux.security_context.namespace_options.network == pb.NODE
    assert not config.HasField("dns_config")
    container = convert.container_config(t.ContainerSpec(name="c", image="busybox"), sandbox)
    assert container.linux.security_context.namespace_options.network == pb.NODE


def test_privileged_sandbox_and_container() -> None:
    sandbox = t.SandboxSpec(name="n", namespace="ns", uid="u", privileged=True)
    config = convert.sandbox_config(sandbox)
    assert config.linux.security_context.privileged
    assert config.linux.security_context.namespace_options.network == pb.POD
    container = convert.container_config(
        t.ContainerSpec(name="c", image="busybox", privileged=True), sandbox
    )
    assert container.linux.security_context.privileged
    plain = convert.container_config(t.ContainerSpec(name="d", image="busybox"), sandbox)
    assert not plain.linux.security_context.privileged
    assert not convert.sandbox_config(SANDBOX).linux.security_context.privileged


def test_container_config() -> None:
    spec = t.ContainerSpec(
        name="app",
        image="busybox:1.35",
        attempt=1,
        command=("sh", "-c"),
        args=("echo hi",),
        working_dir="/tmp",
        env={"A": "1", "B": "two words"},
        mounts=(t.Mount(container_path="/data", host_path="/srv/data", readonly=True),),
        labels={"capsa.container": "k1"},
        annotations={"a": "b"},
        log_path="app_1.log",
        tty=True,
        cpu_period=100000,
        cpu_quota=50000,
        cpu_shares=512,
        memory_limit_bytes=64 << 20,
    )
    config = convert.container_config(spec, SANDBOX)
    assert (config.metadata.name, config.metadata.attempt) == ("app", 1)
    assert config.image.image == "busybox:1.35"
    assert list(config.command) == ["sh", "-c"] and list(config.args) == ["echo hi"]
    assert config.working_dir == "/tmp"
    assert [(e.key, e.value) for e in config.envs] == [("A", b"1"), ("B", b"two words")]
    assert [(m.container_path, m.host_path, m.readonly) for m in config.mounts] == [
        ("/data", "/srv/data", True)
    ]
    assert dict(config.labels) == {"capsa.container": "k1"}
    assert config.log_path == "app_1.log"
    assert config.tty and not config.stdin
    resources = config.linux.resources
    assert (resources.cpu_period, resources.cpu_quota, resources.cpu_shares) == (100000, 50000, 512)
    assert resources.memory_limit_in_bytes == 64 << 20
    assert not config.linux.HasField("security_context")


def test_container_without_limits_sends_no_resources() -> None:
    config = convert.container_config(t.ContainerSpec(name="c", image="i"), SANDBOX)
    assert not config.HasField("linux")


def test_pod_sandbox_and_status_from_proto() -> None:
    metadata = pb.PodSandboxMetadata(name="web", uid="u", namespace="ns", attempt=3)
    listed = convert.pod_sandbox(
        pb.PodSandbox(
            id="s1",
            metadata=metadata,
            state=pb.SANDBOX_NOTREADY,
            created_at=42,
            labels={"l": "v"},
            runtime_handler="runc",
        )
    )
    assert listed == t.PodSandbox(
        id="s1",
        name="web",
        namespace="ns",
        uid="u",
        attempt=3,
        state=t.SandboxState.NOT_READY,
        created_at=42,
        labels={"l": "v"},
        annotations={},
        runtime_handler="runc",
    )
    status = convert.sandbox_status(
        pb.PodSandboxStatus(
            id="s1",
            metadata=metadata,
            state=pb.SANDBOX_READY,
            network=pb.PodSandboxNetworkStatus(
                ip="10.217.0.5", additional_ips=[pb.PodIP(ip="fd00::5")]
            ),
        )
    )
    assert status.state is t.SandboxState.READY
    assert (status.ip, status.additional_ips) == ("10.217.0.5", ("fd00::5",))


def test_container_and_status_from_proto() -> None:
    metadata = pb.ContainerMetadata(name="app", attempt=1)
    listed = convert.container(
        pb.Container(
            id="c1",
            pod_sandbox_id="s1",
            metadata=metadata,
            image=pb.ImageSpec(image="busybox"),
            image_ref="sha256:1",
            state=pb.CONTAINER_RUNNING,
            labels={"k": "v"},
        )
    )
    assert (listed.id, listed.sandbox_id, listed.name, listed.attempt) == ("c1", "s1", "app", 1)
    assert listed.state is t.ContainerState.RUNNING and listed.labels == {"k": "v"}
    status = convert.container_status(
        pb.ContainerStatus(
            id="c1",
            metadata=metadata,
            state=pb.CONTAINER_EXITED,
            started_at=10,
            finished_at=20,
            exit_code=137,
            reason="OOMKilled",
            message="out of memory",
            log_path="/logs/app_1.log",
        )
    )
    assert status.state is t.ContainerState.EXITED
    assert (status.exit_code, status.reason, status.message) == (137, "OOMKilled", "out of memory")
    assert (status.started_at, status.finished_at, status.log_path) == (10, 20, "/logs/app_1.log")


def test_filters() -> None:
    assert convert.sandbox_filter("", None) == pb.PodSandboxFilter()
    filter_ = convert.container_filter("s1", {"a": "b"}, t.ContainerState.EXITED)
    assert filter_.pod_sandbox_id == "s1" and dict(filter_.label_selector) == {"a": "b"}
    assert filter_.state.state == pb.CONTAINER_EXITED
    assert not convert.container_filter(None, None, None).HasField("state")


def test_stats_status_and_auth() -> None:
    stats = convert.container_stats(
        pb.ContainerStats(
            attributes=pb.ContainerAttributes(id="c1"),
            cpu=pb.CpuUsage(usage_core_nano_seconds=pb.UInt64Value(value=5)),
            memory=pb.MemoryUsage(
                working_set_bytes=pb.UInt64Value(value=7), usage_bytes=pb.UInt64Value(value=9)
            ),
        )
    )
    assert stats == t.ContainerStats("c1", 5, 7, 9, 0)
    status = convert.runtime_status(
        pb.StatusResponse(
            status=pb.RuntimeStatus(
                conditions=[
                    pb.RuntimeCondition(type="RuntimeReady", status=True),
                    pb.RuntimeCondition(type="NetworkReady", status=False, reason="NoCNI"),
                ]
            )
        )
    )
    assert status.runtime_ready and not status.network_ready
    assert status.condition("NetworkReady") == t.RuntimeCondition("NetworkReady", False, "NoCNI")
    auth = convert.auth_config(t.ImageAuth(username="u", password="secret"))
    assert (auth.username, auth.password) == ("u", "secret")
    assert "secret" not in repr(t.ImageAuth(username="u", password="secret"))
