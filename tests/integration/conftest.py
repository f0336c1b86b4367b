"""Fixtures for integration tests: root, the real kernel, a real containerd and registry.

Runtime fixtures (capsa.runtime):

- ``host_runtime``: one :class:`HostRuntime` for the whole session (registry, local images,
  containerd) in a unique state dir ``/tmp/capsa-it-<random>`` with a unique registry port and
  cgroup parent; torn down completely at the end, even after failures.
- ``host_cri``: a :class:`CriClient` on that runtime, one per test.
- ``private_runtime_config``: the settings of another instance (own state dir and registry
  port, the session's image cache), for tests that start and stop one themselves; whatever
  they leave running or mounted is removed afterwards.
- ``runtime_test_config`` and ``running_host_runtime`` build and run a private instance with
  other settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from capsa.config import AgentConfig, Config, ImagesConfig, RegistryConfig
from capsa.cri.client import CriClient
from capsa.runtime.host import HostRuntime

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("integration tests need root")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_state_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="capsa-it-", dir="/tmp"))


def runtime_test_config(state_dir: Path, **changes: Any) -> Config:
    """Settings of a private instance: its own state dir, registry port and cgroup parent."""
    cfg = Config(
        state_dir=state_dir,
        registry=RegistryConfig(listen=f"127.0.0.1:{free_port()}"),
        agent=AgentConfig(cgroup_parent=f"/{state_dir.name}"),
    )
    return dataclasses.replace(cfg, **changes)


async def remove_all_sandboxes(cfg: Config) -> None:
    async with CriClient(cfg.cri_socket, timeout=30) as cri:
        for sandbox in await cri.list_pod_sandboxes():
            await cri.stop_pod_sandbox(sandbox.id)
            await cri.remove_pod_sandbox(sandbox.id)


def unmount_under(path: Path) -> None:
    """Unmounts whatever is still mounted below ``path``, deepest first."""
    prefix = f"{path}/"
    mounts = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(prefix)
    ]
    for mountpoint in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], check=False, timeout=10)


def remove_cgroup_parent(cgroup_parent: str) -> None:
    """The cgroupfs parent runc made in every hierarchy; empty once the pods are gone."""
    for hierarchy in CGROUP_ROOT.iterdir():
        with contextlib.suppress(OSError):
            (hierarchy / cgroup_parent.strip("/")).rmdir()


async def tear_down_host_runtime(runtime: HostRuntime) -> None:
    """Stops and removes everything an instance made, whatever state it is in."""
    cfg = runtime.cfg
    try:
        if runtime.containerd.process.is_running():
            await remove_all_sandboxes(cfg)
    finally:
        await runtime.stop()
        unmount_under(cfg.state_dir)
        remove_cgroup_parent(cfg.agent.cgroup_parent)
        shutil.rmtree(cfg.state_dir, ignore_errors=True)


@contextlib.contextmanager
def running_host_runtime(cfg: Config) -> Iterator[HostRuntime]:
    """A started HostRuntime for ``cfg``, torn down and removed on exit."""
    _require_root()
    runtime = HostRuntime(cfg)
    try:
        asyncio.run(runtime.ensure_running())
        yield runtime
    finally:
        asyncio.run(tear_down_host_runtime(runtime))


@pytest.fixture(scope="session")
def host_runtime() -> Iterator[HostRuntime]:
    _require_root()
    with running_host_runtime(runtime_test_config(new_state_dir())) as runtime:
        yield runtime


@pytest.fixture
async def private_runtime_config(host_runtime: HostRuntime) -> AsyncIterator[Config]:
    cache = str(host_runtime.cfg.image_cache_dir)
    cfg = runtime_test_config(new_state_dir(), images=ImagesConfig(cache_dir=cache))
    try:
        yield cfg
    finally:
        # A new HostRuntime adopts, through their pid files, whatever the test left running.
        await tear_down_host_runtime(HostRuntime(cfg))


@pytest.fixture
async def host_cri(host_runtime: HostRuntime) -> AsyncIterator[CriClient]:
    cfg = host_runtime.cfg
    async with CriClient(
        host_runtime.cri_endpoint,
        timeout=cfg.agent.cri_timeout,
        pull_timeout=cfg.agent.image_pull_timeout,
    ) as cri:
        yield cri
