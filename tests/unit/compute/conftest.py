"""A fake CRI runtime for the agent's unit tests (the integration tests use the real containerd).

It keeps sandboxes and containers in memory with the behaviour the agent relies on: labels and
filters, name reservation per (name, attempt), containers that cannot be restarted, not-found
errors, containers that exit when a test says so (or at once, for commands named in
``exits_at_start``), starts that fail as runc's do (``fails_at_start``, ``unstartable``), and
starts cut short by their caller, whose task containerd 1.6 keeps (``cut_short``): it refuses to
remove such a container, or its sandbox, until the task is freed (``free_task``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from capsa.compute.driver import CapsuleDriver, DriverSettings
from capsa.compute.images import ImagePuller
from capsa.cri import types as cri
from capsa.cri.client import CriError, CriNotFound
from capsa.network.service import NetworkService
from capsa.store import Store

# What containerd 1.6 says of a StartContainer cancelled once the shim had made the task.
CUT_SHORT_KEEPING_THE_TASK = (
    "failed to create containerd task: failed to get task pid: context canceled: unknown"
)


@dataclass
class FakeCri:
    images: set[str] = field(default_factory=set)
    missing_images: set[str] = field(default_factory=set)
    sandboxes: dict[str, cri.PodSandbox] = field(default_factory=dict)
    containers: dict[str, cri.ContainerStatus] = field(default_factory=dict)
    container_sandbox: dict[str, str] = field(default_factory=dict)
    # Exit codes of containers whose first command word is a key, as soon as they start.
    exits_at_start: dict[str, int] = field(default_factory=dict)
    # Why a start fails, for containers whose first command word is a key (a command that cannot
    # run) and for the containers whose ids are keys (made wrong): the container ends exited
    # with code 128, as containerd leaves a container whose start failed.
    fails_at_start: dict[str, str] = field(default_factory=dict)
    unstartable: dict[str, str] = field(default_factory=dict)
    pulls: list[str] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    # What each sandbox and container was made from, by id.
    specs: dict[str, cri.SandboxSpec | cri.ContainerSpec] = field(default_factory=dict)
    # The host process of a container, by id (what a verbose status names).
    pids: dict[str, int] = field(default_factory=dict)
    # Containers StopContainer was asked to stop, and the timeouts it was given, in order.
    stopped: list[str] = field(default_factory=list)
    stop_timeouts: list[int] = field(default_factory=list)
    unavailable: bool = False
    # Containers CRI calls exited whose task containerd still holds, and those freed, in order.
    stranded: set[str] = field(default_factory=set)
    freed: list[str] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.unavailable:
            raise CriError(name, "UNAVAILABLE", "cannot reach the container runtime")

    # ---- images ----

    async def image_status(self, image: str) -> str | None:
        self._call("ImageStatus")
        return f"sha256:{image}" if image in self.images else None

    async def pull_image(self, image: str, auth: object = None) -> str:
        self._call("PullImage")
        self.pulls.append(image)
        if image in self.missing_images:
            raise CriError(
                "PullImage", "UNKNOWN", f"pulling image {image} failed: {image}: not found"
            )
        self.images.add(image)
        return f"sha256:{image}"

    # ---- sandboxes ----

    async def run_pod_sandbox(self, spec: cri.SandboxSpec) -> str:
        self._call("RunPodSandbox")
        for s in self.sandboxes.values():
            if (s.name, s.namespace, s.attempt) == (spec.name, spec.namespace, spec.attempt):
                raise CriError(
                    "RunPodSandbox", "UNKNOWN", f"name {spec.name} is reserved for {s.id}"
                )
        sandbox_id = f"sb{next(self._ids)}"
        self.sandboxes[sandbox_id] = cri.PodSandbox(
            id=sandbox_id,
            name=spec.name,
            namespace=spec.namespace,
            uid=spec.uid,
            attempt=spec.attempt,
            state=cri.SandboxState.READY,
            created_at=next(self._ids),
            labels=dict(spec.labels),
            annotations=dict(spec.annotations),
            runtime_handler=spec.runtime_handler,
        )
        self.specs[sandbox_id] = spec
        return sandbox_id

    def add_sandbox(
        self, labels: Mapping[str, str], state: cri.SandboxState, attempt: int = 0
    ) -> str:
        sandbox_id = f"sb{next(self._ids)}"
        self.sandboxes[sandbox_id] = cri.PodSandbox(
            sandbox_id, labels.get("io.capsa.capsule", "x"), "p1", "u", attempt, state,
            next(self._ids), dict(labels), {}, "runc",
        )  # fmt: skip
        return sandbox_id

    async def stop_pod_sandbox(self, sandbox_id: str) -> None:
        self._call("StopPodSandbox")
        if sandbox_id in self.sandboxes:
            self.sandboxes[sandbox_id] = replace(
                self.sandboxes[sandbox_id], state=cri.SandboxState.NOT_READY
            )
            for cid, sid in self.container_sandbox.items():
                if sid == sandbox_id:
                    self.exit(cid, 137)

    async def remove_pod_sandbox(self, sandbox_id: str) -> None:
        self._call("RemovePodSandbox")
        for cid in self.stranded:
            if self.container_sandbox.get(cid) == sandbox_id:
                # Stopped first, then refused at the container's removal.
                await self.stop_pod_sandbox(sandbox_id)
                raise CriError(
                    "RemovePodSandbox",
                    "UNKNOWN",
                    f'failed to remove container "{cid}": {_task_blocks_removal(cid)}',
                )
        self.sandboxes.pop(sandbox_id, None)
        for cid in [c for c, s in self.container_sandbox.items() if s == sandbox_id]:
            self.containers.pop(cid)
            self.container_sandbox.pop(cid)

    async def pod_sandbox_status(self, sandbox_id: str) -> cri.SandboxStatus:
        self._call("PodSandboxStatus")
        if sandbox_id not in self.sandboxes:
            raise CriNotFound("PodSandboxStatus", "NOT_FOUND", f"sandbox {sandbox_id} not found")
        s = self.sandboxes[sandbox_id]
        return cri.SandboxStatus(
            s.id, s.name, s.namespace, s.uid, s.attempt, s.state, s.created_at, "", (),
            s.labels, s.annotations, s.runtime_handler,
        )  # fmt: skip

    async def list_pod_sandboxes(
        self, labels: Mapping[str, str] | None = None
    ) -> list[cri.PodSandbox]:
        self._call("ListPodSandbox")
        return [s for s in self.sandboxes.values() if _matches(s.labels, labels)]

    # ---- containers ----

    async def create_container(
        self, sandbox_id: str, spec: cri.ContainerSpec, sandbox: cri.SandboxSpec
    ) -> str:
        self._call("CreateContainer")
        if sandbox_id not in self.sandboxes:
            raise CriNotFound("CreateContainer", "NOT_FOUND", f"sandbox {sandbox_id} not found")
        for cid, c in self.containers.items():
            if self.container_sandbox[cid] == sandbox_id and (c.name, c.attempt) == (
                spec.name,
                spec.attempt,
            ):
                raise CriError("CreateContainer", "UNKNOWN", f"name {spec.name} is reserved")
        container_id = f"c{next(self._ids)}"
        self.containers[container_id] = cri.ContainerStatus(
            id=container_id, name=spec.name, attempt=spec.attempt,
            state=cri.ContainerState.CREATED, created_at=next(self._ids), started_at=0,
            finished_at=0, exit_code=0, reason="", message="", image=spec.image,
            image_ref=spec.image, log_path=f"/logs/{spec.log_path}", labels=dict(spec.labels),
            annotations={"command": " ".join(spec.command)},
        )  # fmt: skip
        self.container_sandbox[container_id] = sandbox_id
        self.specs[container_id] = spec
        return container_id

    async def start_container(self, container_id: str) -> None:
        self._call("StartContainer")
        status = self.containers[container_id]
        assert status.state is cri.ContainerState.CREATED, "a container starts once"
        program = status.annotations["command"].split(" ")[0]
        why = self.unstartable.get(container_id) or self.fails_at_start.get(program)
        if why is not None:
            self.exit(container_id, 128, "StartError")
            raise CriError(
                "StartContainer",
                "UNKNOWN",
                f"starting container {container_id} failed: failed to create containerd task: "
                f"failed to create shim task: OCI runtime create failed: {why}: unknown",
            )
        self.containers[container_id] = replace(
            status, state=cri.ContainerState.RUNNING, started_at=time.time_ns()
        )
        if program in self.exits_at_start:
            self.exit(container_id, self.exits_at_start[program])

    def exit(self, container_id: str, code: int, reason: str = "") -> None:
        self.containers[container_id] = replace(
            self.containers[container_id],
            state=cri.ContainerState.EXITED,
            exit_code=code,
            finished_at=time.time_ns(),
            reason=reason or ("Completed" if code == 0 else "Error"),
        )

    async def stop_container(self, container_id: str, timeout_s: int) -> None:
        self._call("StopContainer")
        self.stopped.append(container_id)
        self.stop_timeouts.append(timeout_s)
        if container_id in self.containers:
            self.exit(container_id, 143)

    def cut_short(self, container_id: str, message: str = CUT_SHORT_KEEPING_THE_TASK) -> None:
        """What containerd 1.6 leaves of a container whose StartContainer its caller cancelled:
        exited, saying ``message``, and its task kept when the shim had made it."""
        self.exit(container_id, 128, "StartError")
        self.containers[container_id] = replace(self.containers[container_id], message=message)
        if message == CUT_SHORT_KEEPING_THE_TASK:
            self.stranded.add(container_id)

    async def free_task(self, container_id: str) -> None:
        self.freed.append(container_id)
        self.stranded.discard(container_id)

    async def remove_container(self, container_id: str) -> None:
        self._call("RemoveContainer")
        if container_id in self.stranded:
            raise CriError(
                "RemoveContainer", "FAILED_PRECONDITION", _task_blocks_removal(container_id)
            )
        self.containers.pop(container_id, None)
        self.container_sandbox.pop(container_id, None)

    async def list_containers(
        self, sandbox_id: str | None = None, labels: Mapping[str, str] | None = None
    ) -> list[cri.Container]:
        self._call("ListContainers")
        return [
            _listed(c, self.container_sandbox[c.id])
            for c in self.containers.values()
            if (sandbox_id is None or self.container_sandbox[c.id] == sandbox_id)
            and _matches(c.labels, labels)
        ]

    async def container_status(self, container_id: str) -> cri.ContainerStatus:
        self._call("ContainerStatus")
        if container_id not in self.containers:
            raise CriNotFound("ContainerStatus", "NOT_FOUND", f"container {container_id} not found")
        return self.containers[container_id]

    async def container_pid(self, container_id: str) -> int | None:
        self._call("ContainerStatus")
        return self.pids.get(container_id)

    def by_name(self, name: str) -> list[cri.ContainerStatus]:
        return sorted(
            (c for c in self.containers.values() if c.name == name), key=lambda c: c.attempt
        )


def _task_blocks_removal(container_id: str) -> str:
    return (
        f'failed to delete containerd container "{container_id}": '
        f"cannot delete running task {container_id}: failed precondition"
    )


def _listed(c: cri.ContainerStatus, sandbox_id: str) -> cri.Container:
    return cri.Container(
        id=c.id,
        sandbox_id=sandbox_id,
        name=c.name,
        attempt=c.attempt,
        image=c.image,
        image_ref=c.image_ref,
        state=c.state,
        created_at=c.created_at,
        labels=c.labels,
        annotations=c.annotations,
    )


def _matches(have: Mapping[str, str], want: Mapping[str, str] | None) -> bool:
    return all(have.get(k) == v for k, v in (want or {}).items())


@dataclass
class Retries:
    """What the driver asked the agent to look at again, and after how long."""

    asked: list[tuple[str, float]] = field(default_factory=list)

    def __call__(self, capsule_uuid: str, delay: float) -> None:
        self.asked.append((capsule_uuid, delay))


@pytest.fixture
def fake_cri() -> FakeCri:
    return FakeCri(images={"busybox"})


@pytest.fixture
def retries() -> Retries:
    return Retries()


@pytest.fixture
def network(store: Store) -> NetworkService:
    return NetworkService(store, "10.9.0.0/24", 1500)


@pytest.fixture
def settings(tmp_path: Path) -> DriverSettings:
    return DriverSettings(
        host="h1",
        default_runtime="runc",
        pod_log_dir=tmp_path / "pods",
        cgroup_parent="/capsa-test",
        stop_grace_period=1,
        restart_backoff_base=0.0,
        restart_backoff_max=0.0,
        max_sandbox_calls=2,
    )


@pytest.fixture
def driver(
    settings: DriverSettings,
    store: Store,
    fake_cri: FakeCri,
    network: NetworkService,
    retries: Retries,
) -> CapsuleDriver:
    return CapsuleDriver(
        settings,
        store,
        fake_cri,
        network,
        ImagePuller(fake_cri),
        retries,  # type: ignore[arg-type]
        fake_cri.free_task,
    )
