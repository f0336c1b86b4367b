"""capsa's own runtime on a real host: registry, offline images, containerd, adoption, stop."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import pytest

from capsa.config import Config, ContainerdConfig
from capsa.cri.client import CriClient
from capsa.runtime.containerd import render_containerd_config
from capsa.runtime.errors import HostRuntimeError
from capsa.runtime.host import HostRuntime
from capsa.runtime.images import (
    build_layout,
    busybox_recipe,
    ensure_local_images,
    layout_digest,
    pause_recipe,
    push_missing,
)
from capsa.runtime.process import start_time
from capsa.runtime.registry import LocalRegistry

pytestmark = pytest.mark.integration


async def test_registry_serves_the_local_images(host_runtime: HostRuntime) -> None:
    registry = host_runtime.registry
    assert registry is not None
    version = busybox_recipe().tags[1]
    for repository, tag in [
        ("capsa/pause", "3.9"),
        ("library/busybox", "latest"),
        ("library/busybox", version),
    ]:
        assert await registry.has_manifest(repository, tag), f"{repository}:{tag}"
    assert not await registry.has_manifest("library/busybox", "0.0-missing")


async def test_second_call_builds_and_pushes_nothing(host_runtime: HostRuntime) -> None:
    cfg, registry = host_runtime.cfg, host_runtime.registry
    assert registry is not None
    cache_before = sorted(p.name for p in cfg.image_cache_dir.iterdir())
    await ensure_local_images(cfg, registry)
    assert sorted(p.name for p in cfg.image_cache_dir.iterdir()) == cache_before
    for recipe in (pause_recipe(), busybox_recipe()):
        layout = await build_layout(recipe, cfg.image_cache_dir)
        assert layout.name in cache_before
        assert await push_missing(recipe, layout, registry) == []
        assert await registry.manifest_digest(recipe.repository, recipe.tags[0]) == layout_digest(
            layout
        )


async def test_concurrent_builds_share_one_cache_entry(host_runtime: HostRuntime) -> None:
    cache = host_runtime.cfg.state_dir / "shared-cache"
    recipe = pause_recipe()
    first, second = await asyncio.gather(build_layout(recipe, cache), build_layout(recipe, cache))
    assert first == second
    # One complete layout, no scratch directories left behind.
    assert [p.name for p in cache.iterdir()] == [first.name]
    assert layout_digest(first).startswith("sha256:")


async def test_adopt_restart_on_new_config_and_stop(private_runtime_config: Config) -> None:
    cfg = private_runtime_config
    cached = sorted(p.name for p in cfg.image_cache_dir.iterdir())
    runtime = HostRuntime(cfg)
    await runtime.ensure_running()
    # The instances share an image cache: nothing was built, the cached layouts were pushed.
    assert sorted(p.name for p in cfg.image_cache_dir.iterdir()) == cached
    assert runtime.registry is not None
    containerd_pid = runtime.containerd.process.pid
    registry_pid = runtime.registry.process.pid
    assert containerd_pid is not None and registry_pid is not None

    # A later capsa (new objects, same settings) adopts both processes.
    again = HostRuntime(cfg)
    await again.ensure_running()
    assert again.containerd.process.pid == containerd_pid
    assert again.registry is not None and again.registry.process.pid == registry_pid

    # Another sandbox image is another config: containerd is restarted with it.
    await again.containerd.ensure_running("127.0.0.1:1/other/pause:1")
    restarted_pid = again.containerd.process.pid
    assert restarted_pid is not None and restarted_pid != containerd_pid
    assert start_time(containerd_pid) is None
    config_text = again.containerd.config_path.read_text()
    assert config_text == render_containerd_config(cfg, "127.0.0.1:1/other/pause:1")
    async with CriClient(cfg.cri_socket, timeout=5) as cri:
        assert (await cri.version()).runtime_api_version == "v1"

    await again.stop()
    assert start_time(restarted_pid) is None and start_time(registry_pid) is None
    assert not again.containerd.process.is_running()
    assert not again.registry.process.is_running()
    assert not list(cfg.run_dir.glob("*.pid"))


async def test_failed_start_stops_what_it_started(private_runtime_config: Config) -> None:
    binary = private_runtime_config.state_dir / "bin" / "containerd"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\necho 'containerd: cannot start: no space left' >&2\nexit 1\n")
    binary.chmod(0o755)
    cfg = dataclasses.replace(
        private_runtime_config,
        containerd=ContainerdConfig(binary=str(binary), start_timeout=5),
    )
    runtime = HostRuntime(cfg)
    with pytest.raises(HostRuntimeError, match="no space left"):
        await runtime.ensure_running()
    assert runtime.registry is not None
    assert not runtime.registry.process.is_running()
    assert not runtime.containerd.process.is_running()


async def test_registry_port_taken_is_reported(private_runtime_config: Config) -> None:
    registry = LocalRegistry(private_runtime_config)
    host, port = private_runtime_config.registry.listen.rsplit(":", 1)
    with socket.socket() as taken:
        # Bound, not listening: the registry cannot bind, and probes are refused at once.
        taken.bind((host, int(port)))
        with pytest.raises(HostRuntimeError, match="bind: address already in use"):
            await registry.ensure_running()
    assert not registry.process.is_running()
