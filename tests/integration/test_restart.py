"""capsa killed with SIGKILL while capsules run and while others are being created.

When it starts again, every capsule ends Running (or Error with a reason), none is duplicated,
a sandbox that belongs to no capsule is removed, and the containerd that was left running is reused.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from capsa.cri import types as cri
from capsa.cri.client import CriClient, CriError
from capsa.runtime.shims import lost_shims
from capsa.runtime.tasks import CRI_NAMESPACE

pytestmark = pytest.mark.integration

HTTP = ["sh", "-c", "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 80 -h /www"]


def template(name: str) -> dict[str, Any]:
    return {
        "kind": "capsule",
        "metadata": {"name": name},
        "spec": {
            "initContainers": [{"name": "setup", "image": "busybox", "command": ["true"]}],
            "containers": [
                {"name": "http", "image": "busybox", "command": HTTP},
                {"name": "idle", "image": "busybox", "command": ["sleep", "3600"]},
            ],
        },
    }


def names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{uuid.uuid4().hex[:8]}" for _ in range(count)]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_orphan_sandbox(socket: str, log_dir: Path) -> str:
    """A sandbox with capsa's labels whose capsule does not exist, as a crash could leave."""

    async def run() -> str:
        async with CriClient(socket) as client:
            owner = str(uuid.uuid4())
            return await client.run_pod_sandbox(
                cri.SandboxSpec(
                    name=owner,
                    namespace="orphans",
                    uid=owner,
                    log_directory=str(log_dir),
                    labels={"io.capsa.managed": "true", "io.capsa.capsule": owner},
                    host_network=True,
                )
            )

    return asyncio.run(run())


def runtime_view(socket: str) -> tuple[list[cri.PodSandbox], list[cri.Container]]:
    async def query() -> tuple[list[cri.PodSandbox], list[cri.Container]]:
        async with CriClient(socket) as client:
            return await client.list_pod_sandboxes(), await client.list_containers()

    return asyncio.run(query())


def test_sigkill_while_creating_then_restart_recovers_everything(private_capsa: Any) -> None:
    capsa = private_capsa
    # Short enough that the resync stops a shim containerd lost within the test (2 x 5 s).
    capsa.env.update(CAPSA_AGENT_CRI_TIMEOUT="5", CAPSA_AGENT_RESYNC_INTERVAL="1")
    capsa.start()
    running = names("run", 3)
    with ThreadPoolExecutor(5) as pool:
        list(pool.map(lambda n: capsa.create(template(n)), running))
        list(pool.map(lambda n: capsa.wait_status(n, ("Running",)), running))

        creating = names("new", 5)
        list(pool.map(lambda n: capsa.create(template(n)), creating))
    # Kill once some sandbox or container is being made, so the crash lands mid-way.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        tasks = {capsa.get(n)["task_state"] for n in creating}
        if tasks & {"container_creating", "container_starting"}:
            break
        time.sleep(0.02)
    statuses_at_kill = [capsa.get(n)["status"] for n in creating]
    identity_files = {f: f.read_bytes() for f in (capsa.state_dir / "identity").iterdir()}
    token_before = capsa.admin_token()
    capsa.kill()
    assert "Creating" in statuses_at_kill, "the kill did not land while capsules were created"

    containerd_pid = int((capsa.state_dir / "run" / "containerd.pid").read_text())
    assert pid_alive(containerd_pid), "containerd must survive capsa's crash"
    orphan = start_orphan_sandbox(capsa.cri_socket, capsa.state_dir / "orphan-logs")

    capsa.start()

    # The second start bootstraps nothing: same key, passwords and clouds.yaml, passwords printed
    # once (at the first start), and a token from before the crash still valid.
    assert {f: f.read_bytes() for f in (capsa.state_dir / "identity").iterdir()} == identity_files
    assert capsa.log_path.read_text().count("has the password") == 2
    status, _ = capsa.request("GET", "/v1/capsules", headers={"X-Auth-Token": token_before})
    assert status == 200

    everyone = running + creating
    final = [capsa.wait_status(n, ("Running", "Error")) for n in everyone]
    for capsule in final:
        if capsule["status"] == "Error":
            assert capsule["status_reason"], capsule
    # A string, which pytest shows whole: a status_reason is what tells a rare race apart.
    assert [c["status"] for c in final] == ["Running"] * len(everyone), "\n".join(
        f"{c['name']}: {c['status']} {c['status_reason'] or ''}" for c in final
    )
    assert int((capsa.state_dir / "run" / "containerd.pid").read_text()) == containerd_pid

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        sandboxes, containers = runtime_view(capsa.cri_socket)
        if orphan not in {s.id for s in sandboxes}:
            break
        time.sleep(0.5)
    assert orphan not in {s.id for s in sandboxes}, "the orphan sandbox was not removed"

    capsule_uuids = {c["uuid"] for c in final}
    per_capsule = Counter(s.labels["io.capsa.capsule"] for s in sandboxes)
    assert per_capsule == dict.fromkeys(capsule_uuids, 1)
    assert all(s.state is cri.SandboxState.READY for s in sandboxes)
    current = {s.id for s in sandboxes}
    per_container = Counter(
        c.labels["io.capsa.container"] for c in containers if c.sandbox_id in current
    )
    expected = {x["uuid"] for c in final for x in c["containers"] + c["init_containers"]}
    assert per_container == dict.fromkeys(expected, 1), "a container was duplicated or lost"
    ips = [a["addr"] for c in final for net in c["addresses"].values() for a in net]
    assert len(set(ips)) == len(everyone)

    # A crash in the middle of a sandbox start can leave a shim that containerd lost: it goes too.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        # Against the sandboxes of the moment: a shim of one made since is not lost.
        now = {s.id for s in runtime_view(capsa.cri_socket)[0]}
        lost = lost_shims(capsa.cri_socket, now, min_age_s=0)
        if not lost:
            break
        time.sleep(0.5)
    shim_lines = [line for line in capsa.log_path.read_text().splitlines() if "shim" in line]
    assert lost == [], (
        f"shims that serve no sandbox still run: {lost}, sandboxes {sorted(now)}; "
        + "capsa's log about shims:\n"
        + "\n".join(shim_lines[-20:])
    )


def ctr(socket: str, *args: str) -> str:
    """containerd's own client, on the instance's containerd and in CRI's namespace."""
    return subprocess.run(
        ["ctr", "--address", socket, "--namespace", CRI_NAMESPACE, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout


def strand_a_task(capsa: Any, capsule: dict[str, Any]) -> str:
    """A container in the capsule's sandbox that CRI calls exited (128, StartError) while
    containerd keeps its task, as a StartContainer cut short once the shim made the task leaves
    it. Made without timing luck: containerd's own client makes and starts the task first, so
    that CRI's StartContainer fails on it. Returns the container's id."""

    async def create() -> tuple[str, str]:
        async with CriClient(capsa.cri_socket) as client:
            (sandbox,) = await client.list_pod_sandboxes({"io.capsa.capsule": capsule["uuid"]})
            sandbox_spec = cri.SandboxSpec(
                name=sandbox.name,
                namespace=sandbox.namespace,
                uid=sandbox.uid,
                attempt=sandbox.attempt,
                log_directory=str(capsa.state_dir / "stranded-logs"),
            )
            spec = cri.ContainerSpec(
                name="stranded",
                image="busybox",
                command=("sleep", "3600"),
                labels={"io.capsa.managed": "true", "io.capsa.capsule": capsule["uuid"]},
            )
            return sandbox.id, await client.create_container(sandbox.id, spec, sandbox_spec)

    async def start_then_status(container_id: str) -> cri.ContainerStatus:
        async with CriClient(capsa.cri_socket) as client:
            with pytest.raises(CriError, match="already exists"):
                await client.start_container(container_id)
            return await client.container_status(container_id)

    _, container_id = asyncio.run(create())
    ctr(capsa.cri_socket, "tasks", "start", "--detach", "--null-io", container_id)
    status = asyncio.run(start_then_status(container_id))
    assert (status.state, status.exit_code, status.reason) == (
        cri.ContainerState.EXITED,
        128,
        "StartError",
    )
    assert container_id in ctr(capsa.cri_socket, "tasks", "list", "--quiet").split()
    return container_id


def test_a_delete_frees_the_task_containerd_keeps_behind_an_exited_container(
    private_capsa: Any,
) -> None:
    capsa = private_capsa
    capsa.start()
    (name,) = names("stranded", 1)
    capsa.create(template(name))
    capsule = capsa.wait_status(name, ("Running",))
    stranded = strand_a_task(capsa, capsule)

    # containerd refuses RemovePodSandbox while it keeps that task: capsa frees it, then the
    # delete goes through.
    capsa.delete(name)
    capsa.wait_gone(name)

    sandboxes, containers = runtime_view(capsa.cri_socket)
    assert [s for s in sandboxes if s.labels.get("io.capsa.capsule") == capsule["uuid"]] == []
    assert stranded not in {c.id for c in containers}
    assert stranded not in ctr(capsa.cri_socket, "tasks", "list", "--quiet").split()
    assert "freeing the task containerd keeps behind an exited container" in (
        capsa.log_path.read_text()
    )
