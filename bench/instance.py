"""capsa instances for the benchmarks, each with its own state dir, ports, network and cgroup
parent, and everything they make removed again.

- :class:`CapsaUp`: ``python -m capsa up`` as a separate process, reached through its API like any
  client. A standard instance runs its own containerd and registry (what ``make up`` runs).
- :class:`PairedRuntime`: capsa's own registry and containerd, started by the benchmark with the
  config capsa renders plus one more runtime handler, :data:`REFERENCE_HANDLER`, whose pods get
  the reference CNI plugins (containerd 1.6's per-handler ``cni_conf_dir``). capsa runs on it
  through ``containerd.socket``, so both sides of a comparison use one containerd.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench import host
from bench.api_client import ApiClient
from capsa.cli.auth import Credentials, login
from capsa.cni.install import REFERENCE_PLUGIN_DIRS
from capsa.config import Config, load_config
from capsa.cri.client import CriClient, CriError
from capsa.network.dataplane import host_ifname
from capsa.runtime.containerd import CRI_PLUGIN, Containerd, render_containerd_config, write_certs_d
from capsa.runtime.host import HostRuntime
from capsa.runtime.images import ensure_local_images, sandbox_image
from capsa.runtime.registry import LocalRegistry
from capsa.runtime.tomlwriter import render_toml

REPO_ROOT = Path(__file__).resolve().parent.parent
# The runtime handler of the reference pods on the paired containerd.
REFERENCE_HANDLER = "bench-reference"
REFERENCE_PLUGINS = ("bridge", "host-local")
_START_TIMEOUT = 120.0
_STOP_TIMEOUT = 60.0
_CRI_TIMEOUT = 30.0
_PR_SET_PDEATHSIG = 1


class Workspace:
    """The run's scratch directory: state dirs of its instances and the image cache they share."""

    def __init__(self) -> None:
        self.root = Path(f"/tmp/capsa-bench-{host.token()}")
        self.root.mkdir(mode=0o700)
        self.image_cache = self.root / "images"

    def new_dir(self, name: str) -> Path:
        path = self.root / f"{name}-{host.token(3)}"
        path.mkdir()
        return path

    def remove(self) -> None:
        host.unmount_under(self.root)
        shutil.rmtree(self.root, ignore_errors=True)


class InstanceSettings:
    """The settings of one capsa instance, as the environment ``capsa up`` reads."""

    def __init__(self, workspace: Workspace, name: str, cidr_prefix: int = 24) -> None:
        self.state_dir = workspace.new_dir(name)
        suffix = host.token(3)
        self.subnet = host.free_subnet(cidr_prefix)
        self.api_url = f"http://127.0.0.1:{host.free_port()}"
        self.cgroup_parent = f"/capsa-bench-{suffix}"
        self.network_name = f"capsa-bench-{suffix}"
        self.host_name = f"bench-{suffix}"
        self.env = {
            "CAPSA_CONFIG": os.devnull,
            "CAPSA_STATE_DIR": str(self.state_dir),
            "CAPSA_HOST_NAME": self.host_name,
            "CAPSA_API_LISTEN": self.api_url.removeprefix("http://"),
            "CAPSA_AGENT_LISTEN": f"127.0.0.1:{host.free_port()}",
            "CAPSA_REGISTRY_LISTEN": f"127.0.0.1:{host.free_port()}",
            "CAPSA_NETWORK_DEFAULT_CIDR": str(self.subnet),
            # The whole pool is the benchmark project's default network.
            "CAPSA_NETWORK_DEFAULT_PREFIXLEN": str(cidr_prefix),
            "CAPSA_AGENT_CGROUP_PARENT": self.cgroup_parent,
            "CAPSA_CNI_NETWORK_NAME": self.network_name,
            "CAPSA_IMAGES_CACHE_DIR": str(workspace.image_cache),
            "CAPSA_LOG_LEVEL": "INFO",
            # The instance's clouds.yaml stays in its state dir, out of /etc/openstack.
            "CAPSA_AUTH_CLOUDS_YAML": "",
            # The cases hold more capsules than a project's default quota allows.
            "CAPSA_QUOTA_CONTAINERS": "-1",
            "CAPSA_QUOTA_CPU": "-1",
            "CAPSA_QUOTA_MEMORY": "-1",
        }

    @property
    def config(self) -> Config:
        """Exactly what ``capsa up`` makes of this environment."""
        return load_config(environ=self.env)


class CapsaUp:
    """One ``capsa up`` process; ``stop`` deletes its capsules first, as an operator would."""

    def __init__(
        self,
        settings: InstanceSettings,
        extra_env: Mapping[str, str] = {},
        trace: Path | None = None,
    ) -> None:
        self.settings = settings
        self.env = {**settings.env, **extra_env}
        # With a trace file, capsa runs with its calls timed (bench.tracing).
        self.trace = trace
        self.command = (
            [sys.executable, "-m", "bench.tracing", str(trace), "up"]
            if trace
            else [sys.executable, "-m", "capsa", "up"]
        )
        self.log_path = settings.state_dir / "capsa-up.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._token: str | None = None

    @property
    def config(self) -> Config:
        return load_config(environ=self.env)

    def token(self) -> str:
        """A token of the admin that capsa up bootstrapped, as a tenant's tool would get one."""
        if self._token is None:
            identity_dir = self.config.identity_dir
            password = (identity_dir / "admin.password").read_text().strip()
            credentials = Credentials(f"{self.api_url}/v3", "admin", password, "admin")
            self._token = login(credentials)
        return self._token

    @property
    def api_url(self) -> str:
        return self.settings.api_url

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("capsa up is not running")
        return self.process.pid

    def client(self) -> ApiClient:
        return ApiClient(self.api_url, self.token())

    def start(self) -> None:
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                self.command,
                env={**os.environ, **self.env},
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                # Its own session: a Ctrl-C reaches the benchmark, which stops capsa in order.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"capsa up exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.api_url + "/", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(
            f"capsa up did not answer within {_START_TIMEOUT:g}s:\n{self.log_tail()}"
        )

    def delete_all_capsules(self, timeout: float = 120.0) -> None:
        """Deletes every capsule and waits until they are gone; nothing when capsa is not up."""
        if self.process is None or self.process.poll() is not None:
            return
        with self.client() as api:
            capsules = api.capsules()
            for capsule in capsules:
                api.delete_capsule(capsule["uuid"])
            deadline = time.monotonic() + timeout
            while api.capsules():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"capsules still exist after {timeout:g}s")
                time.sleep(0.1)

    def stop(self, delete_capsules: bool = True) -> None:
        """Deletes every capsule, then SIGTERM; SIGKILL only if capsa does not stop."""
        if self.process is None:
            return
        try:
            if delete_capsules:
                self.delete_all_capsules()
        finally:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
            self.process = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class PairedRuntime:
    """capsa's registry and containerd (capsa's config plus the reference handler), the
    reference CNI conf dir, and the reference plugins linked into capsa's CNI bin dir."""

    def __init__(self, settings: InstanceSettings) -> None:
        self.cfg = settings.config
        self.reference_subnet = host.free_subnet(24)
        suffix = host.token(3)
        self.reference_bridge = f"cbench{suffix}"
        self.reference_network = f"bench-ref-{suffix}"
        self.reference_conf_dir = reference_conf_dir(settings.state_dir)
        self.reference_ipam_dir = settings.state_dir / "reference" / "ipam"
        self.registry = LocalRegistry(self.cfg)
        self.containerd = Containerd(self.cfg)

    @property
    def cri_socket(self) -> str:
        return self.cfg.cri_socket

    def reference_conf(self) -> dict[str, Any]:
        """bridge + host-local as a runtime would configure them for a pod network: the bridge
        holds the gateway, the pod gets an address and a default route, nothing is masqueraded
        (capsa's network is not either)."""
        return {
            "cniVersion": "1.0.0",
            "name": self.reference_network,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.reference_bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "mtu": self.cfg.network.mtu,
                    "ipam": {
                        "type": "host-local",
                        "subnet": str(self.reference_subnet),
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.reference_ipam_dir),
                    },
                }
            ],
        }

    def containerd_config(self) -> str:
        config = tomllib.loads(render_containerd_config(self.cfg, sandbox_image(self.cfg)))
        runtimes = config["plugins"][CRI_PLUGIN]["containerd"]["runtimes"]
        capsa_handler = runtimes[self.cfg.agent.runtimes[0]]
        runtimes[REFERENCE_HANDLER] = {
            **capsa_handler,
            "cni_conf_dir": str(self.reference_conf_dir),
            "cni_max_conf_num": 1,
            "options": {
                **capsa_handler["options"],
                "Root": str(self.cfg.containerd_dir / "runc" / REFERENCE_HANDLER),
            },
        }
        return render_toml(config)

    async def start(self) -> None:
        self.reference_conf_dir.mkdir(parents=True, exist_ok=True)
        (self.reference_conf_dir / "10-reference.conflist").write_text(
            json.dumps(self.reference_conf(), indent=2)
        )
        self.cfg.cni_bin_dir.mkdir(parents=True, exist_ok=True)
        for plugin in REFERENCE_PLUGINS:
            (self.cfg.cni_bin_dir / plugin).symlink_to(_reference_plugin(plugin))
        await self.registry.ensure_running()
        await ensure_local_images(self.cfg, self.registry)
        self.containerd.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.containerd.config_path.write_text(self.containerd_config())
        write_certs_d(self.cfg)
        await self.containerd.process.start()
        async with CriClient(self.cri_socket, timeout=1.0) as cri:

            async def answers() -> bool:
                if not Path(self.cri_socket).exists():
                    return False
                try:
                    await cri.version()
                except CriError:
                    return False
                return True

            await self.containerd.process.wait_until_ready(
                answers, _START_TIMEOUT, what=f"answering CRI on {self.cri_socket}"
            )

    def forget_reference(self) -> None:
        """The reference network's bridge and cached results (the reference plugins keep both)."""
        host.delete_link(self.reference_bridge)
        host.remove_cni_results(self.reference_network)


def _reference_plugin(name: str) -> Path:
    for directory in REFERENCE_PLUGIN_DIRS:
        if os.access(directory / name, os.X_OK):
            return directory / name
    raise FileNotFoundError(
        f"the reference CNI plugin {name!r} is in none of "
        f"{', '.join(map(str, REFERENCE_PLUGIN_DIRS))}: apt-get install containernetworking-plugins"
    )


async def remove_all_sandboxes(cfg: Config) -> None:
    """Stops and removes every sandbox of an instance's containerd.

    A sandbox whose network cannot be torn down (capsa's CNI daemon stopped, or failing) would
    stay for ever, with its pause process and netns: its networks' confs are then swapped for a
    plugin that forgets, containerd reloads them, and the sandbox goes; so does its host veth.
    """
    async with CriClient(cfg.cri_socket, timeout=_CRI_TIMEOUT) as cri:
        stuck = []
        for sandbox in await cri.list_pod_sandboxes():
            try:
                await cri.stop_pod_sandbox(sandbox.id)
            except CriError:
                stuck.append(sandbox.id)
                continue
            await cri.remove_pod_sandbox(sandbox.id)
        if not stuck:
            return
        _forget_networks(cfg)
        for sandbox_id in stuck:
            await _stop_once_reloaded(cri, sandbox_id)
            await cri.remove_pod_sandbox(sandbox_id)
            veth = host_ifname(sandbox_id, "eth0")
            if host.link_exists(veth):
                host.delete_link(veth)


_FORGETFUL_PLUGIN = "bench-forget"
_RELOAD_ATTEMPTS = 50


def _forget_networks(cfg: Config) -> None:
    """Every CNI conf of the instance (capsa's and the reference's) becomes one plugin that
    succeeds at everything and does nothing."""
    plugin = cfg.cni_bin_dir / _FORGETFUL_PLUGIN
    plugin.write_text("#!/bin/sh\ncat >/dev/null\nexit 0\n")
    plugin.chmod(0o755)
    for conf_dir in (cfg.cni_conf_dir, reference_conf_dir(cfg.state_dir)):
        for conf in conf_dir.glob("*.conflist"):
            name = json.loads(conf.read_text())["name"]
            forgetful = {"cniVersion": "1.0.0", "name": name, "plugins": [{"type": plugin.name}]}
            conf.write_text(json.dumps(forgetful))


async def _stop_once_reloaded(cri: CriClient, sandbox_id: str) -> None:
    for attempt in range(_RELOAD_ATTEMPTS):
        try:
            await cri.stop_pod_sandbox(sandbox_id)
            return
        except CriError:
            if attempt == _RELOAD_ATTEMPTS - 1:
                raise
            await asyncio.sleep(0.1)


def reference_conf_dir(state_dir: Path) -> Path:
    return state_dir / "reference" / "net.d"


def remove_instance(settings: InstanceSettings) -> None:
    """Whatever an instance left: a containerd or registry it ran (adopted through their pid
    files), sandboxes, mounts, cgroups, the network's bridge, cached CNI results, its state dir."""
    cfg = settings.config
    runtime = HostRuntime(cfg)
    try:
        if runtime.containerd.process.is_running():
            with contextlib.suppress(CriError):
                asyncio.run(remove_all_sandboxes(cfg))
    finally:
        asyncio.run(runtime.stop())
        host.remove_stale_shim_sockets(cfg.containerd_dir / "containerd.log", cfg.cri_socket)
        host.unmount_under(settings.state_dir)
        host.remove_cgroup(settings.cgroup_parent)
        for link in host.links_with_addresses_in(settings.subnet):
            host.delete_link(link)
        host.remove_cni_results(settings.network_name)
        shutil.rmtree(settings.state_dir, ignore_errors=True)


def _die_with_parent() -> None:
    # capsa stops in order on SIGTERM, also when the benchmark is killed outright.
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
