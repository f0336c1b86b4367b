"""capsa's CRI client against the real containerd that capsa runs for itself."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from capsa.cri import types as t
from capsa.cri.client import CriClient, CriError, CriNotFound
from capsa.runtime.host import HostRuntime
from capsa.runtime.images import sandbox_image

pytestmark = pytest.mark.integration


async def test_version_answers_v1(host_cri: CriClient) -> None:
    version = await host_cri.version()
    assert version.runtime_api_version == "v1"
    assert version.runtime_name == "containerd"
    assert (await host_cri.status()).runtime_ready


async def test_pull_busybox_by_bare_name_through_the_docker_io_mirror(
    host_cri: CriClient,
) -> None:
    ref = await host_cri.pull_image("busybox")
    assert ref.startswith("sha256:")
    assert await host_cri.image_status("docker.io/library/busybox:latest") == ref
    assert await host_cri.pull_image("busybox:1.35") == ref


async def test_pull_of_a_missing_image_names_it(
    host_cri: CriClient, host_runtime: HostRuntime
) -> None:
    assert host_runtime.registry is not None
    image = f"{host_runtime.registry.host}/capsa-it/missing-{uuid.uuid4().hex[:8]}:1"
    with pytest.raises(CriError) as err:
        await host_cri.pull_image(image)
    assert err.value.method == "PullImage"
    assert image in str(err.value)
    assert await host_cri.image_status(image) is None


async def _wait_for_line(path: Path, text: str, timeout: float = 10) -> str:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        content = path.read_text() if path.exists() else ""
        if text in content or asyncio.get_running_loop().time() > deadline:
            return content
        await asyncio.sleep(0.05)


async def test_host_network_pod_lifecycle(host_cri: CriClient, host_runtime: HostRuntime) -> None:
    cfg, registry = host_runtime.cfg, host_runtime.registry
    assert registry is not None
    run = uuid.uuid4().hex[:8]
    labels = {"capsa-it": run}
    sandbox = t.SandboxSpec(
        name=f"it-{run}",
        namespace="capsa-it",
        uid=str(uuid.uuid4()),
        log_directory=str(cfg.pod_log_dir / run),
        labels=labels,
        cgroup_parent=cfg.agent.cgroup_parent,
        host_network=True,
    )
    line = f"hello from {run}"
    container = t.ContainerSpec(
        name="echo",
        image="busybox",
        command=("sh", "-c", f"echo '{line}'; exec sleep 300"),
        labels=labels,
        log_path="echo_0.log",
        memory_limit_bytes=64 << 20,
    )
    await host_cri.pull_image("busybox")
    sandbox_id = await host_cri.run_pod_sandbox(sandbox)
    try:
        status = await host_cri.pod_sandbox_status(sandbox_id)
        assert status.state is t.SandboxState.READY
        assert [s.id for s in await host_cri.list_pod_sandboxes(labels)] == [sandbox_id]

        # The sandbox runs capsa's pause image, pulled from the local registry.
        pause = sandbox_image(cfg)
        pause_digest = await registry.manifest_digest("capsa/pause", "3.9")
        images = {tag: i for i in await host_cri.list_images() for tag in i.repo_tags}
        assert f"{registry.host}/capsa/pause@{pause_digest}" in images[pause].repo_digests

        container_id = await host_cri.create_container(sandbox_id, container, sandbox)
        await host_cri.start_container(container_id)
        listed = await host_cri.list_containers(labels=labels)
        assert [(c.id, c.sandbox_id, c.state) for c in listed] == [
            (container_id, sandbox_id, t.ContainerState.RUNNING)
        ]

        status_c = await host_cri.container_status(container_id)
        assert status_c.log_path == str(cfg.pod_log_dir / run / "echo_0.log")
        log = await _wait_for_line(Path(status_c.log_path), line)
        assert f" stdout F {line}\n" in log

        result = await host_cri.exec_sync(
            container_id, ["sh", "-c", "echo out; echo err >&2; exit 3"], timeout_s=10
        )
        assert result == t.ExecResult(exit_code=3, stdout=b"out\n", stderr=b"err\n")

        await host_cri.stop_container(container_id, timeout_s=5)
        stopped = await host_cri.container_status(container_id)
        assert stopped.state is t.ContainerState.EXITED
        assert stopped.finished_at >= stopped.started_at > 0

        await host_cri.remove_container(container_id)
        assert await host_cri.list_containers(labels=labels) == []
        with pytest.raises(CriNotFound):
            await host_cri.container_status(container_id)
        # Gone already: delete paths succeed.
        await host_cri.stop_container(container_id, timeout_s=1)
        await host_cri.remove_container(container_id)
    finally:
        await host_cri.stop_pod_sandbox(sandbox_id)
        await host_cri.remove_pod_sandbox(sandbox_id)
    assert await host_cri.list_pod_sandboxes(labels) == []
    await host_cri.stop_pod_sandbox(sandbox_id)
    await host_cri.remove_pod_sandbox(sandbox_id)
