"""capsa's own containerd: its config, its registry mirrors (certs.d) and its process.

Everything it keeps lives under ``cfg.containerd_dir`` (root, state, socket, runc state), so
that several instances run side by side without seeing each other. When ``containerd.socket``
is set, capsa uses that runtime instead and starts nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from capsa.config import Config
from capsa.cri.client import CriClient, CriError
from capsa.files import write_if_changed
from capsa.log import get_logger
from capsa.runtime.errors import HostRuntimeError
from capsa.runtime.process import ManagedProcess
from capsa.runtime.registry import registry_host
from capsa.runtime.tomlwriter import render_toml

log = get_logger(__name__)

CRI_PLUGIN = "io.containerd.grpc.v1.cri"

# Plugins that cannot work on this kind of host or that capsa never uses; skipping them saves
# start time and log noise (aufs runs modprobe, devmapper fails without a pool).
DISABLED_PLUGINS = (
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.native",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.internal.v1.restart",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)

# Where the real registry of a mirrored host is, when it is not https://<host>.
_UPSTREAMS = {"docker.io": "https://registry-1.docker.io"}

_PROBE_TIMEOUT = 1.0


class ContainerdError(HostRuntimeError):
    """containerd cannot be used; the message says why."""


def certs_dir(cfg: Config) -> Path:
    return cfg.containerd_dir / "certs.d"


def render_containerd_config(cfg: Config, sandbox_image: str) -> str:
    """containerd 1.6's config (version 2) for capsa's instance."""
    base = cfg.containerd_dir
    runtimes = {
        handler: {
            "runtime_type": "io.containerd.runc.v2",
            "options": {
                "BinaryName": shutil.which(handler) or handler,
                # Each instance keeps its own runc state, so that instances never collide.
                "Root": str(base / "runc" / handler),
                "SystemdCgroup": False,
            },
        }
        for handler in cfg.agent.runtimes
    }
    config = {
        "version": 2,
        "root": str(base / "root"),
        "state": str(base / "state"),
        "disabled_plugins": list(DISABLED_PLUGINS),
        "grpc": {"address": cfg.cri_socket},
        "debug": {"level": "warn"},
        "plugins": {
            "io.containerd.internal.v1.opt": {"path": str(base / "opt")},
            CRI_PLUGIN: {
                "sandbox_image": sandbox_image,
                # Required on hosts without CAP_SYS_RESOURCE: RunPodSandbox fails otherwise.
                "restrict_oom_score_adj": True,
                "containerd": {
                    "snapshotter": "overlayfs",
                    "default_runtime_name": cfg.agent.runtimes[0],
                    "runtimes": runtimes,
                },
                "cni": {
                    "bin_dir": str(cfg.cni_bin_dir),
                    "conf_dir": str(cfg.cni_conf_dir),
                    "max_conf_num": 1,
                },
                # hosts.toml files only; containerd refuses the legacy mirrors tables with it.
                "registry": {"config_path": str(certs_dir(cfg))},
            },
        },
    }
    return render_toml(config)


def render_hosts_toml(cfg: Config, host: str) -> str:
    """certs.d/<host>/hosts.toml: pull ``host``'s images from capsa's registry first."""
    return render_toml(
        {
            "server": _UPSTREAMS.get(host, f"https://{host}"),
            "host": {f"http://{registry_host(cfg)}": {"capabilities": ["pull", "resolve"]}},
        }
    )


def write_certs_d(cfg: Config) -> None:
    """One hosts.toml per mirrored host when the registry runs; removes any other host dir."""
    root = certs_dir(cfg)
    hosts = cfg.registry.mirror_of if cfg.registry.enabled else ()
    wanted = {host: render_hosts_toml(cfg, host) for host in hosts}
    if root.is_dir():
        for stale in root.iterdir():
            if stale.name in wanted:
                continue
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
    for host, content in wanted.items():
        write_if_changed(root / host / "hosts.toml", content)


class Containerd:
    def __init__(self, cfg: Config, stop_timeout: float = 10.0) -> None:
        self._cfg = cfg
        self._stop_timeout = stop_timeout
        self.config_path = cfg.containerd_dir / "config.toml"
        self.socket = Path(cfg.cri_socket)
        self.process = ManagedProcess(
            "containerd",
            [cfg.containerd.binary, "--config", str(self.config_path)],
            pidfile=cfg.run_dir / "containerd.pid",
            logfile=cfg.containerd_dir / "containerd.log",
        )

    async def ensure_running(self, sandbox_image: str) -> None:
        """Adopts a containerd already running with this config, else starts one.

        Returns when it answers CRI Version; with ``containerd.socket`` set it only checks that.
        """
        if not self._cfg.manages_containerd:
            await self._check_external()
            return
        changed = write_if_changed(
            self.config_path, render_containerd_config(self._cfg, sandbox_image)
        )
        write_certs_d(self._cfg)
        if changed and self.process.is_running():
            log.info("containerd config changed, restarting it", config=self.config_path)
            await self.stop()
        async with CriClient(str(self.socket), timeout=_PROBE_TIMEOUT) as cri:

            async def answers() -> bool:
                if not self.socket.exists():
                    return False
                try:
                    await cri.version()
                except CriError:
                    return False
                return True

            if not self.process.is_running():
                # A socket without a process is left from a crash; containerd cannot bind it.
                self.socket.unlink(missing_ok=True)
                await self.process.start()
            await self.process.wait_until_ready(
                answers, self._cfg.containerd.start_timeout, what=f"answering CRI on {self.socket}"
            )
        log.info("containerd ready", socket=self.socket, pid=self.process.pid)

    async def stop(self) -> None:
        """Stops capsa's containerd (its containers keep running in their shims)."""
        if self._cfg.manages_containerd:
            await self.process.stop(self._stop_timeout)

    async def _check_external(self) -> None:
        timeout = self._cfg.containerd.start_timeout
        async with CriClient(str(self.socket), timeout=timeout) as cri:
            try:
                version = await cri.version()
            except CriError as exc:
                raise ContainerdError(
                    f"the CRI socket {self.socket} (setting containerd.socket) "
                    f"does not answer: {exc}"
                ) from exc
        log.info(
            "using an existing CRI runtime",
            socket=self.socket,
            runtime=version.runtime_name,
            version=version.runtime_version,
        )
