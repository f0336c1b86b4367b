"""``capsa up``: capsa all-in-one on this host, in the foreground, until SIGTERM or Ctrl-C.

Order matters: the CNI plugin and its daemon are ready before containerd can run a sandbox; the
agent registers the host before the scheduler places anything; the API opens last, so that once it
answers, capsa is whole. Stopping runs the same steps backwards. containerd and the registry run in
their own sessions: if capsa is killed, they keep running and the next ``capsa up`` adopts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import signal
from collections.abc import Awaitable
from contextlib import AsyncExitStack

from aiohttp import web

from capsa.api.app import create_app
from capsa.cni.daemon import CniDaemon
from capsa.cni.install import install_cni
from capsa.compute.agent import ComputeAgent
from capsa.compute.server import AgentServer
from capsa.config import Config
from capsa.cri.client import CriClient
from capsa.identity.admin import IdentityAdmin
from capsa.log import get_logger, setup_logging
from capsa.network import firewall
from capsa.network.agent import NetworkAgent, OverlaySettings
from capsa.network.dataplane import Dataplane
from capsa.network.enforcement import EnforcedPorts, FirewallProgress
from capsa.network.service import NetworkService
from capsa.runtime.host import HostRuntime
from capsa.scheduler.service import Scheduler
from capsa.store import Store

log = get_logger("capsa.up")


def run_up(cfg: Config) -> int:
    _one_malloc_arena()
    setup_logging(cfg.log.level, cfg.log.format)
    return asyncio.run(_up(cfg))


async def _up(cfg: Config) -> int:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None

    def on_signal(signum: int) -> None:
        log.info("stopping capsa", signal=signal.Signals(signum).name)
        for sig in (signal.SIGINT, signal.SIGTERM):
            # A second signal must not interrupt the orderly stop.
            loop.add_signal_handler(sig, log.info, "capsa is already stopping")
        main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        async with AsyncExitStack() as stack:
            await _start(cfg, stack)
            # What start-up made lives as long as capsa: out of the collector's sight, a full
            # collection walks only what requests make (it was 22 ms per list page).
            gc.collect()
            gc.freeze()
            _return_free_memory()
            log.info("capsa is up", api=cfg.api_url, host=cfg.resolved_host_name)
            await asyncio.Event().wait()
    except asyncio.CancelledError:
        log.info("capsa stopped")
        return 0
    except Exception as exc:
        log.error(f"capsa could not start: {exc}")
        return 1
    return 0


async def _start(cfg: Config, stack: AsyncExitStack) -> None:
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    install_cni(cfg)
    if cfg.manages_containerd:
        runtime = HostRuntime(cfg)
        await runtime.ensure_running()
        stack.push_async_callback(runtime.stop)

    store = Store(cfg.database_url, wakeup_poll_interval=cfg.wakeup_poll_interval)
    stack.push_async_callback(store.close)
    await store.open()
    if cfg.auth.mode == "local" and cfg.auth.bootstrap:
        # Printed, never logged: the one time a generated password is shown.
        for announcement in await IdentityAdmin(store.identity).bootstrap(cfg):
            print(announcement, flush=True)

    network = NetworkService(
        store, cfg.network.default_cidr, cfg.network.mtu, cfg.network.default_prefixlen
    )
    dataplane = Dataplane()
    # The daemon plugs a port only once the network agent's firewall enforces it.
    progress = FirewallProgress()
    cni_daemon = CniDaemon(
        EnforcedPorts(progress, network),
        cfg.cni_daemon_address,
        dataplane=dataplane,
        progress=progress,
        bridge_linger=cfg.cni.bridge_linger,
    )
    await _listening(
        cni_daemon.start(), "the CNI daemon", cfg.cni_daemon_address, "cni.daemon_listen"
    )
    stack.push_async_callback(cni_daemon.stop)

    cri_client = CriClient(
        cfg.cri_socket, timeout=cfg.agent.cri_timeout, pull_timeout=cfg.agent.image_pull_timeout
    )
    stack.push_async_callback(cri_client.close)
    agent_server = AgentServer(cri_client, cfg.agent.listen)
    await _listening(agent_server.start(), "the agent", cfg.agent.listen, "agent.listen")
    stack.push_async_callback(agent_server.stop)
    agent = ComputeAgent(cfg, store, cri_client, network)
    await agent.start()
    stack.push_async_callback(agent.stop)
    network_agent = NetworkAgent(
        store,
        cfg.resolved_host_name,
        firewall.table_name(str(cfg.state_dir)),
        dataplane,
        cfg.agent.resync_interval,
        OverlaySettings(cfg.network.tunnel_ip, cfg.network.vxlan_port)
        if cfg.network.tunnel_ip
        else None,
        progress,
    )
    await network_agent.start()
    stack.push_async_callback(network_agent.stop)

    scheduler = Scheduler(store, cfg.scheduler.resync_interval, cfg.scheduler.host_timeout)
    await scheduler.start()
    stack.push_async_callback(scheduler.stop)

    api_runner = web.AppRunner(create_app(cfg, store), access_log=None)
    await api_runner.setup()
    stack.push_async_callback(api_runner.cleanup)
    host, _, port = cfg.api.listen.rpartition(":")
    await _listening(
        web.TCPSite(api_runner, host, int(port)).start(), "the API", cfg.api.listen, "api.listen"
    )


# mallopt's parameter for the most arenas malloc makes (glibc's M_ARENA_MAX).
_M_ARENA_MAX = -8


def _one_malloc_arena() -> None:
    """Has every thread allocate from glibc's main arena, before any thread starts. By default
    a thread that finds the main arena busy gets an arena of its own, whose freed memory stays
    resident: in about a third of start-ups one did (gRPC's, the database's or the netlink
    threads), and idle capsa kept 1.3-3.5 MB more (86 against 87-89 MB). Python's own objects do
    not come from those arenas, and its threads take turns with the GIL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 1)


def _return_free_memory() -> None:
    """Gives back to the system the heap that start-up used and freed (imports, the schema, the
    firewall's start-up pass): glibc's malloc keeps freed memory resident until told."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


async def _listening(start: Awaitable[None], what: str, address: str, setting: str) -> None:
    """Starts a listener; a refused address is reported with the setting that chooses it."""
    try:
        await start
    except OSError as exc:
        variable = "CAPSA_" + setting.replace(".", "_").upper()
        raise RuntimeError(
            f"{what} cannot listen on {address}: {exc.strerror or exc}; "
            f"choose another address with {setting} ({variable})"
        ) from exc
