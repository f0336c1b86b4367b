"""CriClient against an in-process fake CRI server on a unix socket."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from capsa.cri import types as t
from capsa.cri.client import CriClient, CriError, CriNotFound, endpoint_url, rpc_error
from capsa.cri.proto import api_pb2 as pb

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
SERVICES = ("RuntimeService", "ImageService")
SANDBOX = t.SandboxSpec(name="web", namespace="proj", uid="u1", runtime_handler="runc")
CONTAINER = t.ContainerSpec(name="app", image="busybox")


class FakeCri:
    """Answers every RPC of capsa's proto with an empty response unless told otherwise."""

    def __init__(self) -> None:
        self.requests: dict[str, Any] = {}
        self.deadlines: dict[str, float | None] = {}
        self.behaviors: dict[str, Behavior] = {}

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        handlers = []
        for service_name in SERVICES:
            service = pb.DESCRIPTOR.services_by_name[service_name]
            methods = {}
            for method in service.methods:
                request_type = getattr(pb, method.input_type.name)
                response_type = getattr(pb, method.output_type.name)
                methods[method.name] = grpc.unary_unary_rpc_method_handler(
                    self._handler(method.name, response_type),
                    request_deserializer=request_type.FromString,
                    response_serializer=response_type.SerializeToString,
                )
            handlers.append(grpc.method_handlers_generic_handler(service.full_name, methods))
        return handlers

    def _handler(self, name: str, response_type: Any) -> Behavior:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self.requests[name] = request
            self.deadlines[name] = context.time_remaining()
            behavior = self.behaviors.get(name)
            return await behavior(request, context) if behavior else response_type()

        return handle


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeCri, str]]:
    # Short: unix socket paths are limited to 108 bytes.
    socket = Path(f"/tmp/capsa-test-cri-{uuid.uuid4().hex[:12]}.sock")
    fake = FakeCri()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(fake.handlers())
    server.add_insecure_port(f"unix://{socket}")
    await server.start()
    try:
        yield fake, str(socket)
    finally:
        await server.stop(grace=None)
        socket.unlink(missing_ok=True)


def _abort(code: grpc.StatusCode, details: str) -> Behavior:
    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, details)

    return behavior


async def test_every_rpc_carries_a_deadline(fake: tuple[FakeCri, str]) -> None:
    server, socket = fake
    async with CriClient(socket, timeout=7, pull_timeout=50) as cri:
        await cri.version()
        await cri.status()
        await cri.pull_image("busybox")
        await cri.image_status("busybox")
        await cri.list_images()
        await cri.remove_image("busybox")
        await cri.run_pod_sandbox(SANDBOX)
        await cri.stop_pod_sandbox("s1")
        await cri.remove_pod_sandbox("s1")
        await cri.pod_sandbox_status("s1")
        await cri.list_pod_sandboxes()
        await cri.create_container("s1", CONTAINER, SANDBOX)
        await cri.start_container("c1")
        await cri.stop_container("c1", timeout_s=20)
        await cri.remove_container("c1")
        await cri.list_containers()
        await cri.container_status("c1")
        await cri.exec_sync("c1", ["true"], timeout_s=3)
        await cri.update_container_resources("c1", memory_limit_bytes=1 << 20)
        await cri.container_stats("c1")
    every_rpc = {m.name for s in SERVICES for m in pb.DESCRIPTOR.services_by_name[s].methods}
    assert set(server.deadlines) == every_rpc
    longest = {"PullImage": 50, "StopContainer": 27, "ExecSync": 10}
    remaining = {name: left or 0.0 for name, left in server.deadlines.items()}
    assert None not in server.deadlines.values()
    for name, left in remaining.items():
        # The wire format of a deadline rounds it a little.
        assert 0 < left <= longest.get(name, 7) + 0.1, name
    assert remaining["PullImage"] > 40
    assert remaining["StopContainer"] > 20


async def test_requests_carry_what_the_caller_asked(fake: tuple[FakeCri, str]) -> None:
    server, socket = fake
    async with CriClient(socket) as cri:
        await cri.version()
        await cri.run_pod_sandbox(SANDBOX)
        await cri.create_container("s1", CONTAINER, SANDBOX)
        await cri.stop_container("c1", timeout_s=4)
        await cri.exec_sync("c1", ["ls", "/"], timeout_s=3)
        await cri.pull_image("private/app", auth=t.ImageAuth(username="u", password="p"))
        await cri.list_containers(sandbox_id="s1", labels={"a": "b"})
    assert server.requests["Version"].version == "v1"
    assert server.requests["RunPodSandbox"].runtime_handler == "runc"
    assert server.requests["RunPodSandbox"].config.metadata.name == "web"
    create = server.requests["CreateContainer"]
    assert create.pod_sandbox_id == "s1"
    assert create.config.image.image == "busybox"
    assert create.sandbox_config.metadata.uid == "u1"
    assert server.requests["StopContainer"].timeout == 4
    assert list(server.requests["ExecSync"].cmd) == ["ls", "/"]
    assert server.requests["ExecSync"].timeout == 3
    assert server.requests["PullImage"].auth.password == "p"
    assert server.requests["ListContainers"].filter.pod_sandbox_id == "s1"


async def test_answers_become_plain_values(fake: tuple[FakeCri, str]) -> None:
    server, socket = fake

    async def version(request: Any, context: Any) -> pb.VersionResponse:
        return pb.VersionResponse(runtime_name="containerd", runtime_api_version="v1")

    async def exec_sync(request: Any, context: Any) -> pb.ExecSyncResponse:
        return pb.ExecSyncResponse(stdout=b"out", stderr=b"err", exit_code=3)

    async def run(request: Any, context: Any) -> pb.RunPodSandboxResponse:
        return pb.RunPodSandboxResponse(pod_sandbox_id="sandbox-9")

    server.behaviors.update(Version=version, ExecSync=exec_sync, RunPodSandbox=run)
    async with CriClient(socket) as cri:
        assert (await cri.version()).runtime_api_version == "v1"
        assert await cri.exec_sync("c", ["x"], 1) == t.ExecResult(3, b"out", b"err")
        assert await cri.run_pod_sandbox(SANDBOX) == "sandbox-9"
        # containerd answers a missing image with an empty image, not an error.
        assert await cri.image_status("nothing:here") is None


async def test_pull_failure_names_the_image_and_the_reason(fake: tuple[FakeCri, str]) -> None:
    server, socket = fake
    server.behaviors["PullImage"] = _abort(
        grpc.StatusCode.UNKNOWN, 'failed to pull image "docker.io/private/app:1": 401 Unauthorized'
    )
    async with CriClient(socket) as cri:
        with pytest.raises(CriError) as err:
            await cri.pull_image("private/app:1")
    assert not isinstance(err.value, CriNotFound)
    assert err.value.method == "PullImage" and err.value.code == "UNKNOWN"
    assert "'private/app:1'" in str(err.value) and "401 Unauthorized" in str(err.value)


async def test_stop_and_remove_of_something_gone_succeed(fake: tuple[FakeCri, str]) -> None:
    server, socket = fake
    gone = 'an error occurred when try to find container "c1": not found'
    server.behaviors["StopContainer"] = _abort(grpc.StatusCode.NOT_FOUND, gone)
    server.behaviors["RemoveContainer"] = _abort(grpc.StatusCode.UNKNOWN, gone)
    server.behaviors["StopPodSandbox"] = _abort(grpc.StatusCode.NOT_FOUND, "sandbox: not found")
    server.behaviors["ContainerStatus"] = _abort(grpc.StatusCode.NOT_FOUND, gone)
    async with CriClient(socket) as cri:
        await cri.stop_container("c1", 1)
        await cri.remove_container("c1")
        await cri.stop_pod_sandbox("s1")
        with pytest.raises(CriNotFound, match="c1"):
            await cri.container_status("c1")


async def test_other_failures_of_delete_paths_are_raised(fake: tuple[FakeCri, str]) -> None:
    server, socket = fake
    server.behaviors["StopPodSandbox"] = _abort(
        grpc.StatusCode.UNKNOWN, "failed to destroy network for sandbox: plugin capsa failed"
    )
    async with CriClient(socket) as cri:
        with pytest.raises(CriError, match="plugin capsa failed"):
            await cri.stop_pod_sandbox("s1")


async def test_a_hung_runtime_times_out_with_a_clear_error(fake: tuple[FakeCri, str]) -> None:
    server, socket = fake

    async def hang(request: Any, context: Any) -> Any:
        await asyncio.sleep(30)

    server.behaviors["ContainerStatus"] = hang
    async with CriClient(socket, timeout=0.2) as cri:
        with pytest.raises(CriError) as err:
            await cri.container_status("c1")
    assert err.value.code == "DEADLINE_EXCEEDED"
    assert "within 0.2s" in str(err.value) and socket in str(err.value)


async def test_no_runtime_on_the_socket(tmp_path: Path) -> None:
    async with CriClient(str(tmp_path / "missing.sock"), timeout=2) as cri:
        with pytest.raises(CriError) as err:
            await cri.version()
    assert err.value.code == "UNAVAILABLE"
    assert "is containerd running?" in str(err.value)


@pytest.mark.parametrize(
    ("code", "details", "not_found"),
    [
        (grpc.StatusCode.NOT_FOUND, "whatever", True),
        (
            grpc.StatusCode.UNKNOWN,
            'an error occurred when try to find sandbox "x": not found',
            True,
        ),
        (grpc.StatusCode.UNKNOWN, "runc create failed", False),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "not found", False),
        (grpc.StatusCode.UNAVAILABLE, "socket not found", False),
    ],
)
def test_error_mapping(code: grpc.StatusCode, details: str, not_found: bool) -> None:
    err = rpc_error("StopPodSandbox", code, details, "stopping sandbox x", "unix:///s", 5)
    assert isinstance(err, CriNotFound) is not_found
    assert err.code == code.name and err.method == "StopPodSandbox"
    assert "stopping sandbox x" in err.message


def test_endpoint_url() -> None:
    assert endpoint_url("/run/capsa/containerd.sock") == "unix:///run/capsa/containerd.sock"
    assert endpoint_url("unix:///run/x.sock") == "unix:///run/x.sock"
    assert endpoint_url("unix:/run/x.sock") == "unix:/run/x.sock"
