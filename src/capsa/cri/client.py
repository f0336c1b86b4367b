"""A typed async client for a CRI runtime (containerd) on its unix socket.

One gRPC channel per client, opened on first use and kept for the client's life; every call
has a deadline; failures become :class:`CriError` (or :class:`CriNotFound`) with a message that
names what failed and why::

    async with CriClient(cfg.cri_socket, timeout=cfg.agent.cri_timeout,
                         pull_timeout=cfg.agent.image_pull_timeout) as cri:
        await cri.pull_image("busybox")
        sandbox_id = await cri.run_pod_sandbox(sandbox)
        container_id = await cri.create_container(sandbox_id, container, sandbox)
        await cri.start_container(container_id)

Create the client inside a running event loop. Stopping or removing something that is already
gone succeeds, so that delete paths can be retried.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from capsa.cri import convert
from capsa.cri import types as t
from capsa.cri.proto import api_pb2 as pb
from capsa.cri.proto.api_pb2_grpc import ImageServiceStub, RuntimeServiceStub

CRI_API_VERSION = "v1"

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # Reconnect quickly when the runtime restarts (the default backoff reaches two minutes).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


# Failures of the call itself, whatever the text says about the object.
_TRANSPORT_CODES = frozenset(
    (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
)


class CriError(Exception):
    """A CRI call failed. ``code`` is the gRPC status name, e.g. ``NOT_FOUND``."""

    def __init__(self, method: str, code: str, message: str) -> None:
        super().__init__(f"CRI {method}: {message} [{code}]")
        self.method = method
        self.code = code
        self.message = message


class CriNotFound(CriError):
    """The sandbox, container or image does not exist."""


def endpoint_url(endpoint: str) -> str:
    """``unix:///path`` for a bare socket path; other gRPC targets are kept as they are."""
    return endpoint if ":" in endpoint.split("/", 1)[0] else f"unix://{endpoint}"


class CriClient:
    def __init__(self, endpoint: str, timeout: float = 30.0, pull_timeout: float = 300.0) -> None:
        self.endpoint = endpoint_url(endpoint)
        self.timeout = timeout
        self.pull_timeout = pull_timeout
        self._channel = grpc.aio.insecure_channel(self.endpoint, options=_CHANNEL_OPTIONS)
        # The generated stubs carry no type hints; their calls are typed at each use below.
        self._runtime = RuntimeServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._images = ImageServiceStub(self._channel)  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> CriClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    # ---- runtime ----

    async def version(self, timeout: float | None = None) -> t.RuntimeVersion:
        resp: pb.VersionResponse = await self._call(
            "Version",
            self._runtime.Version,
            pb.VersionRequest(version=CRI_API_VERSION),
            timeout or self.timeout,
            "asking the runtime's version",
        )
        return convert.runtime_version(resp)

    async def status(self) -> t.RuntimeStatus:
        resp: pb.StatusResponse = await self._call(
            "Status",
            self._runtime.Status,
            pb.StatusRequest(),
            self.timeout,
            "asking the runtime's status",
        )
        return convert.runtime_status(resp)

    # ---- images ----

    async def pull_image(self, image: str, auth: t.ImageAuth | None = None) -> str:
        """Pulls ``image`` and returns its reference (the image id)."""
        request = pb.PullImageRequest(image=pb.ImageSpec(image=image))
        if auth is not None:
            request.auth.CopyFrom(convert.auth_config(auth))
        resp: pb.PullImageResponse = await self._call(
            "PullImage",
            self._images.PullImage,
            request,
            self.pull_timeout,
            f"pulling image {image!r}",
        )
        return resp.image_ref

    async def image_status(self, image: str) -> str | None:
        """The id of ``image`` when the runtime has it, else None."""
        resp: pb.ImageStatusResponse = await self._call(
            "ImageStatus",
            self._images.ImageStatus,
            pb.ImageStatusRequest(image=pb.ImageSpec(image=image)),
            self.timeout,
            f"looking up image {image!r}",
        )
        # A missing image is an empty answer, not an error.
        return resp.image.id or None

    async def list_images(self) -> list[t.Image]:
        resp: pb.ListImagesResponse = await self._call(
            "ListImages",
            self._images.ListImages,
            pb.ListImagesRequest(),
            self.timeout,
            "listing images",
        )
        return [convert.image(i) for i in resp.images]

    async def remove_image(self, image: str) -> None:
        await self._delete(
            "RemoveImage",
            self._images.RemoveImage,
            pb.RemoveImageRequest(image=pb.ImageSpec(image=image)),
            self.timeout,
            f"removing image {image!r}",
        )

    # ---- pod sandboxes ----

    async def run_pod_sandbox(self, spec: t.SandboxSpec) -> str:
        resp: pb.RunPodSandboxResponse = await self._call(
            "RunPodSandbox",
            self._runtime.RunPodSandbox,
            pb.RunPodSandboxRequest(
                config=convert.sandbox_config(spec), runtime_handler=spec.runtime_handler
            ),
            self.timeout,
            f"running sandbox {spec.namespace}/{spec.name}",
        )
        return resp.pod_sandbox_id

    async def stop_pod_sandbox(self, sandbox_id: str) -> None:
        await self._delete(
            "StopPodSandbox",
            self._runtime.StopPodSandbox,
            pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id),
            self.timeout,
            f"stopping sandbox {sandbox_id}",
        )

    async def remove_pod_sandbox(self, sandbox_id: str) -> None:
        await self._delete(
            "RemovePodSandbox",
            self._runtime.RemovePodSandbox,
            pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
            self.timeout,
            f"removing sandbox {sandbox_id}",
        )

    async def pod_sandbox_status(self, sandbox_id: str) -> t.SandboxStatus:
        resp: pb.PodSandboxStatusResponse = await self._call(
            "PodSandboxStatus",
            self._runtime.PodSandboxStatus,
            pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id),
            self.timeout,
            f"asking the status of sandbox {sandbox_id}",
        )
        return convert.sandbox_status(resp.status)

    async def list_pod_sandboxes(
        self, labels: Mapping[str, str] | None = None
    ) -> list[t.PodSandbox]:
        resp: pb.ListPodSandboxResponse = await self._call(
            "ListPodSandbox",
            self._runtime.ListPodSandbox,
            pb.ListPodSandboxRequest(filter=convert.sandbox_filter("", labels)),
            self.timeout,
            "listing sandboxes",
        )
        return [convert.pod_sandbox(s) for s in resp.items]

    # ---- containers ----

    async def create_container(
        self, sandbox_id: str, spec: t.ContainerSpec, sandbox_spec: t.SandboxSpec
    ) -> str:
        resp: pb.CreateContainerResponse = await self._call(
            "CreateContainer",
            self._runtime.CreateContainer,
            pb.CreateContainerRequest(
                pod_sandbox_id=sandbox_id,
                config=convert.container_config(spec, sandbox_spec),
                sandbox_config=convert.sandbox_config(sandbox_spec),
            ),
            self.timeout,
            f"creating container {spec.name!r} (image {spec.image!r}) in sandbox {sandbox_id}",
        )
        return resp.container_id

    async def start_container(self, container_id: str) -> None:
        await self._call(
            "StartContainer",
            self._runtime.StartContainer,
            pb.StartContainerRequest(container_id=container_id),
            self.timeout,
            f"starting container {container_id}",
        )

    async def stop_container(self, container_id: str, timeout_s: int) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s`` seconds."""
        await self._delete(
            "StopContainer",
            self._runtime.StopContainer,
            pb.StopContainerRequest(container_id=container_id, timeout=timeout_s),
            timeout_s + self.timeout,
            f"stopping container {container_id}",
        )

    async def remove_container(self, container_id: str) -> None:
        await self._delete(
            "RemoveContainer",
            self._runtime.RemoveContainer,
            pb.RemoveContainerRequest(container_id=container_id),
            self.timeout,
            f"removing container {container_id}",
        )

    async def list_containers(
        self,
        sandbox_id: str | None = None,
        labels: Mapping[str, str] | None = None,
        state: t.ContainerState | None = None,
    ) -> list[t.Container]:
        resp: pb.ListContainersResponse = await self._call(
            "ListContainers",
            self._runtime.ListContainers,
            pb.ListContainersRequest(filter=convert.container_filter(sandbox_id, labels, state)),
            self.timeout,
            "listing containers",
        )
        return [convert.container(c) for c in resp.containers]

    async def container_status(self, container_id: str) -> t.ContainerStatus:
        resp: pb.ContainerStatusResponse = await self._call(
            "ContainerStatus",
            self._runtime.ContainerStatus,
            pb.ContainerStatusRequest(container_id=container_id),
            self.timeout,
            f"asking the status of container {container_id}",
        )
        return convert.container_status(resp.status)

    async def container_pid(self, container_id: str) -> int | None:
        """The host pid of the container's process, from the runtime's verbose status (containerd's
        ``info``); None when it runs no process or the runtime does not say."""
        resp: pb.ContainerStatusResponse = await self._call(
            "ContainerStatus",
            self._runtime.ContainerStatus,
            pb.ContainerStatusRequest(container_id=container_id, verbose=True),
            self.timeout,
            f"asking the process of container {container_id}",
        )
        return convert.pid_from_info(resp.info)

    async def exec_sync(self, container_id: str, cmd: list[str], timeout_s: int) -> t.ExecResult:
        """Runs ``cmd`` in the container and waits for it, at most ``timeout_s`` seconds."""
        resp: pb.ExecSyncResponse = await self._call(
            "ExecSync",
            self._runtime.ExecSync,
            pb.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=timeout_s),
            timeout_s + self.timeout,
            f"running {cmd!r} in container {container_id}",
        )
        return t.ExecResult(exit_code=resp.exit_code, stdout=resp.stdout, stderr=resp.stderr)

    async def update_container_resources(
        self,
        container_id: str,
        cpu_period: int = 0,
        cpu_quota: int = 0,
        cpu_shares: int = 0,
        memory_limit_bytes: int = 0,
    ) -> None:
        await self._call(
            "UpdateContainerResources",
            self._runtime.UpdateContainerResources,
            pb.UpdateContainerResourcesRequest(
                container_id=container_id,
                linux=convert.linux_resources(
                    cpu_period, cpu_quota, cpu_shares, memory_limit_bytes
                ),
            ),
            self.timeout,
            f"updating the resources of container {container_id}",
        )

    async def container_stats(self, container_id: str) -> t.ContainerStats:
        resp: pb.ContainerStatsResponse = await self._call(
            "ContainerStats",
            self._runtime.ContainerStats,
            pb.ContainerStatsRequest(container_id=container_id),
            self.timeout,
            f"asking the stats of container {container_id}",
        )
        return convert.container_stats(resp.stats)

    # ---- plumbing ----

    async def _call(self, method: str, rpc: Any, request: Any, timeout: float, doing: str) -> Any:
        try:
            return await rpc(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(
                method, exc.code(), exc.details() or "", doing, self.endpoint, timeout
            ) from exc

    async def _delete(
        self, method: str, rpc: Any, request: Any, timeout: float, doing: str
    ) -> None:
        """A stop or remove: the thing being gone already is success."""
        with contextlib.suppress(CriNotFound):
            await self._call(method, rpc, request, timeout, doing)


def rpc_error(
    method: str,
    code: grpc.StatusCode,
    details: str,
    doing: str,
    endpoint: str,
    timeout: float,
) -> CriError:
    """The error for a failed call, worded for the person who has to fix it."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"{doing}: no answer from the container runtime at {endpoint} within {timeout:g}s"
    elif code == grpc.StatusCode.UNAVAILABLE:
        message = (
            f"{doing}: cannot reach the container runtime at {endpoint} "
            f"(is containerd running?): {details}"
        )
    else:
        message = f"{doing} failed: {details}"
    # containerd 1.6 often reports a missing object as UNKNOWN with "not found" in the text.
    not_found = code == grpc.StatusCode.NOT_FOUND or (
        code not in _TRANSPORT_CODES and "not found" in details.lower()
    )
    return (CriNotFound if not_found else CriError)(method, code.name, message)
