"""The references: what the runtime itself does for a pod, without capsa.

A reference pod is made with the raw CRI calls a kubelet makes (RunPodSandbox, CreateContainer,
StartContainer) on the paired containerd, under the reference runtime handler, whose sandboxes are
networked by the reference ``bridge`` + ``host-local`` plugins. Its sandbox and container carry the
settings capsa gives a capsule of the same template: the image, the command, the cgroup parent,
the log directory and path, labels, and the cpu and memory limits of capsa's defaults.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from capsa.config import Config
from capsa.cri import types as cri
from capsa.cri.client import CriClient

T = TypeVar("T")

IMAGE = "busybox"
COMMAND = ("sleep", "3600")
CONTAINER_NAME = "main"
_CPU_PERIOD_US = 100_000
_MIB = 1024 * 1024


def capsule_template(name: str) -> dict[str, Any]:
    """A 1-container busybox capsule (Zun template) with capsa's default requests."""
    return {
        "kind": "capsule",
        "capsuleVersion": "beta",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Always",
            "containers": [{"name": CONTAINER_NAME, "image": IMAGE, "command": list(COMMAND)}],
        },
    }


@dataclass(frozen=True)
class RawPod:
    sandbox_id: str
    container_id: str


class ReferencePods:
    """Pods made and removed with raw CRI calls, like capsules of :func:`capsule_template`."""

    def __init__(self, cri_client: CriClient, cfg: Config, handler: str, log_root: Path) -> None:
        self._cri = cri_client
        self._handler = handler
        self._log_root = log_root
        self._cgroup_parent = cfg.agent.cgroup_parent
        self._grace = cfg.agent.stop_grace_period
        self._cpu_millis = round(cfg.capsule.default_cpu * 1000)
        self._memory_mb = cfg.capsule.default_memory_mb
        # Seconds each CRI call took, by method: the reference's own breakdown.
        self.call_seconds: dict[str, list[float]] = {}

    def _specs(self) -> tuple[cri.SandboxSpec, cri.ContainerSpec]:
        pod_uid = str(uuid.uuid4())
        log_directory = self._log_root / pod_uid
        (log_directory / CONTAINER_NAME).mkdir(parents=True)
        sandbox = cri.SandboxSpec(
            name=pod_uid,
            namespace="bench",
            uid=pod_uid,
            hostname=f"reference-{secrets.token_hex(3)}",
            log_directory=str(log_directory),
            labels={"io.capsa.bench": "reference", "io.capsa.bench.pod": pod_uid},
            runtime_handler=self._handler,
            cgroup_parent=self._cgroup_parent,
        )
        container = cri.ContainerSpec(
            name=CONTAINER_NAME,
            image=IMAGE,
            command=COMMAND,
            labels={"io.capsa.bench": "reference", "io.capsa.bench.pod": pod_uid},
            log_path=f"{CONTAINER_NAME}/0.log",
            cpu_period=_CPU_PERIOD_US,
            cpu_quota=self._cpu_millis * _CPU_PERIOD_US // 1000,
            cpu_shares=max(2, self._cpu_millis * 1024 // 1000),
            memory_limit_bytes=self._memory_mb * _MIB,
        )
        return sandbox, container

    async def run(self) -> RawPod:
        """RunPodSandbox, CreateContainer, StartContainer."""
        sandbox, container = self._specs()
        sandbox_id = await self._timed("RunPodSandbox", self._cri.run_pod_sandbox(sandbox))
        container_id = await self._timed(
            "CreateContainer", self._cri.create_container(sandbox_id, container, sandbox)
        )
        await self._timed("StartContainer", self._cri.start_container(container_id))
        return RawPod(sandbox_id, container_id)

    async def teardown(self, pod: RawPod) -> None:
        """StopContainer (with capsa's grace period), then RemovePodSandbox, which stops the
        sandbox and removes its container: the shortest raw teardown, and the calls capsa makes.
        (A kubelet's RemoveContainer and StopPodSandbox in between cost about 10 ms more, a
        second CNI DEL among them: a reference that made them would flatter capsa.)"""
        await self._timed("StopContainer", self._cri.stop_container(pod.container_id, self._grace))
        await self._timed("RemovePodSandbox", self._cri.remove_pod_sandbox(pod.sandbox_id))

    async def _timed(self, method: str, call: Awaitable[T]) -> T:
        began = time.perf_counter()
        try:
            return await call
        finally:
            self.call_seconds.setdefault(method, []).append(time.perf_counter() - began)
