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

capsa all-in-one fixtures:

- ``capsa``: one ``capsa up`` process for the session (its own state dir, ports, network CIDR,
  host name and cgroup parent); at the end it deletes every capsule, stops capsa with SIGTERM and
  checks that nothing of it still runs.
- ``private_capsa``: an instance of the test's own, not started, for tests that kill or restart
  capsa; removed afterwards whatever state it is in. ``new_capsa`` makes such instances with a
  given state dir or environment.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from capsa.cli.auth import Credentials, login
from capsa.config import AgentConfig, Config, ImagesConfig, RegistryConfig
from capsa.cri.client import CriClient, CriError
from capsa.network import firewall
from capsa.runtime.host import HostRuntime
from capsa.runtime.shims import SHIM_SOCKET_DIR, Shim, shims_of

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Where containerd 1.6 keeps what each CNI ADD returned, whatever its state dir.
CNI_RESULTS_DIR = Path("/var/lib/cni/results")


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("integration tests need root")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_pool(prefixlen: int, first_octet2: int = 64) -> str:
    """A random 10.x.y.0/``prefixlen`` (x from ``first_octet2`` to 249) that no address or route
    of this host overlaps, so that instances running side by side never share addresses."""
    out = subprocess.run(
        ["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    routes = subprocess.run(
        ["ip", "-j", "-4", "route", "show"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    used = [
        ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False)
        for link in json.loads(out)
        for a in link.get("addr_info", [])
    ] + [
        ipaddress.ip_network(r["dst"])
        for r in json.loads(routes)
        if r.get("dst", "default") != "default"
    ]
    size = 2 ** (32 - prefixlen)
    for _ in range(200):
        second = first_octet2 + secrets.randbelow(250 - first_octet2)
        offset = secrets.randbelow(2**16 // size) * size
        pool = ipaddress.ip_network(f"10.{second}.{offset // 256}.{offset % 256}/{prefixlen}")
        if not any(pool.overlaps(u) for u in used):
            return str(pool)
    raise RuntimeError(f"no free /{prefixlen} in 10.{first_octet2}-249.x.x on this host")


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
    """Removes every sandbox it can; raises the first failure once each was tried."""
    failures: list[CriError] = []
    async with CriClient(cfg.cri_socket, timeout=30) as cri:
        for sandbox in await cri.list_pod_sandboxes():
            try:
                await cri.stop_pod_sandbox(sandbox.id)
                await cri.remove_pod_sandbox(sandbox.id)
            except CriError as exc:
                failures.append(exc)
    if failures:
        raise failures[0]


def cgroups_under(cgroup_parent: str) -> list[Path]:
    """The cgroup parent's directories in every hierarchy, and those below it, deepest first."""
    if not cgroup_parent.strip("/"):
        return []  # the root of every hierarchy: never this instance's alone
    found = []
    for hierarchy in [CGROUP_ROOT, *CGROUP_ROOT.iterdir()]:
        top = hierarchy / cgroup_parent.strip("/")
        if (top / "cgroup.procs").exists():
            found += [top, *(d for d in top.rglob("*") if (d / "cgroup.procs").exists())]
    return sorted(found, key=lambda d: len(d.parts), reverse=True)


def kill_what_the_pods_left(cfg: Config) -> None:
    """What is left of pods whose sandbox could not be removed, once containerd is stopped:
    the shims of that containerd (and their sockets), those it lost too (a sandbox start cut
    short by a killed capsa, which serve no sandbox), and every process in the instance's
    cgroup parent (pause and containers)."""
    pids = set()
    for cgroup in cgroups_under(cfg.agent.cgroup_parent):
        with contextlib.suppress(OSError):
            pids |= {int(p) for p in (cgroup / "cgroup.procs").read_text().split()}
    shims = shims_of(cfg.cri_socket)
    for process in [*(shim.pid for shim in shims), *pids]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process, signal.SIGKILL)
    for shim in shims:
        shim.socket_in(SHIM_SOCKET_DIR).unlink(missing_ok=True)


def remove_pod_networks_left(cfg: Config) -> None:
    """The pods' networks that no CNI DEL removed (a sandbox whose removal failed, capsa's CNI
    daemon gone): containerd's cache of each ADD's result names the pod's netns, and the
    conflist that made it, whose daemon socket is in the instance's state dir. Once the pod's
    processes are gone, the netns goes with its mount, and its veths with it; then the entry."""
    if not CNI_RESULTS_DIR.is_dir():
        return
    ours = f"{cfg.state_dir}/"
    for entry in CNI_RESULTS_DIR.iterdir():
        try:
            cached = json.loads(entry.read_text())
            conflist = base64.b64decode(cached["config"]).decode()
        except (OSError, ValueError, KeyError, TypeError, binascii.Error):
            continue
        if ours not in conflist:
            continue
        for interface in cached.get("result", {}).get("interfaces", []):
            netns = interface.get("sandbox")
            if netns:
                subprocess.run(["umount", netns], capture_output=True, check=False, timeout=10)
                Path(netns).unlink(missing_ok=True)
        entry.unlink(missing_ok=True)


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
    """The cgroupfs parent runc made in every hierarchy, and the pods' cgroups that runc left
    in it (a pod stopped by force); each goes once no process is in it."""
    deadline = time.monotonic() + 5
    while True:
        left = []
        for cgroup in cgroups_under(cgroup_parent):
            with contextlib.suppress(FileNotFoundError):
                try:
                    cgroup.rmdir()
                except OSError:
                    left.append(cgroup)
        if not left or time.monotonic() > deadline:
            return
        # Processes killed a moment ago may still be on their way out.
        time.sleep(0.1)


def remove_stale_shim_sockets(cfg: Config) -> None:
    """Sockets that containerd 1.6 leaves in /run/containerd/s when a sandbox start is cut short
    (tests that kill capsa do that). Only this instance's: their names hash its socket address and
    an id from its own containerd's log."""
    log_file = cfg.containerd_dir / "containerd.log"
    if not log_file.exists():
        return
    for shim_id in set(re.findall(r"\b[0-9a-f]{64}\b", log_file.read_text(errors="replace"))):
        shim = Shim(pid=0, id=shim_id, namespace="k8s.io", address=cfg.cri_socket, started=0)
        path = shim.socket_in(SHIM_SOCKET_DIR)
        if path.exists() and not _listening(path):
            path.unlink(missing_ok=True)


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


async def tear_down_host_runtime(runtime: HostRuntime) -> None:
    """Stops and removes everything an instance made, whatever state it is in."""
    cfg = runtime.cfg
    try:
        if runtime.containerd.process.is_running():
            await remove_all_sandboxes(cfg)
    finally:
        try:
            await runtime.stop()
        finally:
            kill_what_the_pods_left(cfg)
            remove_pod_networks_left(cfg)
            remove_stale_shim_sockets(cfg)
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


# ---- capsa all-in-one (`capsa up` as a separate process, driven through its API) ----


class CapsaInstance:
    """One ``capsa up`` process with its own state dir, ports, network and host name.

    The API is reached with plain HTTP like any client; the runtime is inspected through the
    instance's CRI socket, the kernel through ``ip``.
    """

    def __init__(self, state_dir: Path | None = None) -> None:
        self.state_dir = state_dir or new_state_dir()
        suffix = self.state_dir.name.removeprefix("capsa-it-")
        self.api_url = f"http://127.0.0.1:{free_port()}"
        # Room for 16 projects' default networks (a /25 each), clear of this host's addresses.
        self.cidr = free_pool(21, first_octet2=200)
        self.host_name = f"it-{suffix}"
        self.env = {
            **os.environ,
            "CAPSA_CONFIG": os.devnull,
            "CAPSA_STATE_DIR": str(self.state_dir),
            "CAPSA_HOST_NAME": self.host_name,
            "CAPSA_API_LISTEN": self.api_url.removeprefix("http://"),
            "CAPSA_AGENT_LISTEN": f"127.0.0.1:{free_port()}",
            "CAPSA_REGISTRY_LISTEN": f"127.0.0.1:{free_port()}",
            "CAPSA_NETWORK_DEFAULT_CIDR": self.cidr,
            "CAPSA_NETWORK_DEFAULT_PREFIXLEN": "25",
            "CAPSA_AGENT_CGROUP_PARENT": f"/{self.state_dir.name}",
            "CAPSA_AGENT_STOP_GRACE_PERIOD": "2",
            # Long enough that a capsule replacing a network's last one keeps its bridge, short
            # enough that the tests see unused bridges go.
            "CAPSA_CNI_BRIDGE_LINGER": "1",
            "CAPSA_LOG_LEVEL": "DEBUG",
            # The instance's clouds.yaml stays in its state dir, out of /etc/openstack.
            "CAPSA_AUTH_CLOUDS_YAML": "",
        }
        self.log_path = self.state_dir / "capsa-up.log"
        self.process: subprocess.Popen[bytes] | None = None
        # Runs capsa in another network namespace (a "host" of its own): nsenter --net=PATH.
        self.netns: str | None = None
        self._admin_token: str | None = None

    # -- identity: the accounts capsa up bootstraps, and more made with `capsa user create` --

    @property
    def clouds_yaml(self) -> Path:
        return self.state_dir / "identity" / "clouds.yaml"

    @property
    def cli_env(self) -> dict[str, str]:
        """The environment of a client that authenticates as this instance's admin (the cloud
        ``capsa`` of its clouds.yaml), whatever clouds.yaml the machine has."""
        return {**self.env, "OS_CLIENT_CONFIG_FILE": str(self.clouds_yaml), "OS_CLOUD": "capsa"}

    def password(self, user: str) -> str:
        return (self.state_dir / "identity" / f"{user}.password").read_text().strip()

    def login(self, user: str, password: str, project: str) -> str:
        """A token from the instance's /v3, as any Keystone client gets one."""
        return login(Credentials(f"{self.api_url}/v3", user, password, project))

    def admin_token(self, renew: bool = False) -> str:
        if renew or self._admin_token is None:
            self._admin_token = self.login("admin", self.password("admin"), "admin")
        return self._admin_token

    def capsa_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``capsa ARGS`` as the instance's admin."""
        return subprocess.run(
            [sys.executable, "-m", "capsa", *args],
            env=self.cli_env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    def add_user(self, user: str, password: str, project: str, role: str = "member") -> None:
        """A user with ``role`` in ``project`` (made if missing), through `capsa user create`."""
        if self.capsa_cli("project", "create", project).returncode not in (0, 1):
            raise AssertionError(f"capsa project create {project} failed")
        # "--password=": a random password may begin with "-", which argparse would take for
        # an option in the two-word form.
        run = self.capsa_cli(
            "user", "create", user, "--project", project, "--role", role, f"--password={password}"
        )
        assert run.returncode == 0, run.stderr

    def token_headers(self, project: str, role: str = "member") -> dict[str, str]:
        """The headers of a new user with ``role`` in ``project`` (made if missing)."""
        user, password = f"{project}-{role}-{secrets.token_hex(3)}", secrets.token_urlsafe(12)
        self.add_user(user, password, project, role)
        return {"X-Auth-Token": self.login(user, password, project)}

    @property
    def cri_socket(self) -> str:
        return str(self.state_dir / "containerd" / "containerd.sock")

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.state_dir / 'capsa.db'}"

    def start(self, timeout: float = 120.0) -> None:
        with self.log_path.open("ab") as log_file:
            enter = ["nsenter", f"--net={self.netns}"] if self.netns else []
            self.process = subprocess.Popen(
                [*enter, sys.executable, "-m", "capsa", "up"],
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"capsa up exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.api_url + "/", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"capsa up did not answer within {timeout}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL, as a crash would: containerd and the registry keep running."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def stop(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self.process = None
        return code

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def processes(self) -> list[str]:
        """Command lines of the processes that still run from this instance's state dir."""
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if str(self.state_dir) in text:
                    found.append(text)
        return found

    # -- the API, as any HTTP client --

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> tuple[int, Any]:
        """The API's answer; as the instance's admin unless ``headers`` bring another token."""
        for renew in (False, True):
            status, answer = self._exchange(method, path, body, headers, timeout, renew)
            # The admin's token may have expired during a long session: once more with a new one.
            if status != 401 or (headers and "X-Auth-Token" in headers):
                break
        return status, answer

    def _exchange(
        self,
        method: str,
        path: str,
        body: Any,
        headers: dict[str, str] | None,
        timeout: float,
        renew: bool,
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.api_url + path,
            data=data,
            method=method,
            headers={
                "Content-Type": "application/json",
                "OpenStack-API-Version": "container 1.40",
                **(
                    {}
                    if headers and "X-Auth-Token" in headers
                    else {"X-Auth-Token": self.admin_token(renew)}
                ),
                **(headers or {}),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        return status, json.loads(raw) if raw else None

    def create(self, template: dict[str, Any], **headers: str) -> dict[str, Any]:
        status, body = self.request("POST", "/v1/capsules", {"template": template}, headers)
        assert status == 202, body
        return dict(body)

    def get(self, ident: str, headers: dict[str, str] | None = None) -> dict[str, Any] | None:
        status, body = self.request("GET", f"/v1/capsules/{ident}", headers=headers)
        if status == 404:
            return None
        assert status == 200, body
        return dict(body)

    def capsules(self) -> list[dict[str, Any]]:
        status, body = self.request("GET", "/v1/capsules?all_projects=true&limit=1000")
        assert status == 200, body
        return list(body["capsules"])

    def wait_status(
        self,
        ident: str,
        statuses: tuple[str, ...],
        timeout: float = 90.0,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        capsule = None
        while time.monotonic() < deadline:
            capsule = self.get(ident, headers)
            if capsule is not None and capsule["status"] in statuses:
                return capsule
            time.sleep(0.2)
        raise AssertionError(
            f"capsule {ident} did not reach {statuses} in {timeout}s: {capsule}\n{self.log_tail()}"
        )

    def delete(self, ident: str) -> None:
        status, body = self.request("DELETE", f"/v1/capsules/{ident}")
        assert status in (204, 404), body

    def wait_gone(
        self, ident: str, timeout: float = 60.0, headers: dict[str, str] | None = None
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.get(ident, headers) is None:
                return
            time.sleep(0.2)
        raise AssertionError(f"capsule {ident} still exists after {timeout}s\n{self.log_tail()}")

    def containers(self) -> list[dict[str, Any]]:
        """Every project's single containers (/v1/containers)."""
        status, body = self.request("GET", "/v1/containers?all_projects=true&limit=1000")
        assert status == 200, body
        return list(body["containers"])

    def delete_all(self) -> None:
        for container in self.containers():
            # The admin may force: whatever their status, they go.
            status, body = self.request("DELETE", f"/v1/containers/{container['uuid']}?force=1")
            assert status in (204, 404), body
        deadline = time.monotonic() + 60
        while self.containers() and time.monotonic() < deadline:
            time.sleep(0.2)
        capsules = self.capsules()
        for capsule in capsules:
            # The admin reaches every project's capsules by uuid.
            status, body = self.request("DELETE", f"/v1/capsules/{capsule['uuid']}")
            assert status in (204, 404), body
        for capsule in capsules:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and any(
                c["uuid"] == capsule["uuid"] for c in self.capsules()
            ):
                time.sleep(0.2)

    def cleanup(self) -> None:
        """Stops whatever still runs and removes everything the instance made, whatever state
        capsa was left in. A capsa that is not running (killed, or stopped with its pods left
        running) while its containerd holds sandboxes is started again to delete its capsules:
        removing a sandbox takes a CNI DEL, which only capsa's CNI daemon answers (and it unplugs
        the veths). What even that leaves is stopped by force (see tear_down_host_runtime)."""
        running = self.process is not None and self.process.poll() is None
        if not running and self._runtime_holds_sandboxes():
            with contextlib.suppress(Exception):
                self.start(timeout=60)
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(Exception):
                self.delete_all()
            with contextlib.suppress(Exception):
                self.stop()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        cfg = runtime_test_config(self.state_dir)
        try:
            # Adopts, through the pid files, a containerd or registry left by a killed instance.
            asyncio.run(tear_down_host_runtime(HostRuntime(cfg)))
        finally:
            for link in bridges_for(self.cidr):
                subprocess.run(["ip", "link", "del", link], check=False, timeout=10)
            table = firewall.table_name(str(self.state_dir))
            for family in ("inet", "bridge"):
                subprocess.run(
                    ["nft", "delete", "table", family, table], capture_output=True, check=False
                )

    def _runtime_holds_sandboxes(self) -> bool:
        async def listed() -> bool:
            async with CriClient(self.cri_socket, timeout=10) as cri:
                return bool(await cri.list_pod_sandboxes())

        if not Path(self.cri_socket).exists():
            return False
        try:
            return asyncio.run(listed())
        except CriError:
            return False


def bridges_for(cidr: str) -> list[str]:
    """Bridges that hold an address of ``cidr`` (the gateways of an instance's networks)."""
    out = subprocess.run(
        ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    pool = ipaddress.ip_network(cidr)
    return [
        line.split()[1]
        for line in out.splitlines()
        if ipaddress.ip_interface(line.split()[3]).ip in pool
    ]


@pytest.fixture(scope="session")
def capsa() -> Iterator[CapsaInstance]:
    """capsa all-in-one for the session; at the end every capsule is deleted and capsa stopped."""
    _require_root()
    instance = CapsaInstance()
    try:
        instance.start()
        yield instance
        instance.delete_all()
        assert instance.stop() == 0, instance.log_tail()
        assert instance.processes() == [], "capsa up left processes running"
    finally:
        instance.cleanup()


@pytest.fixture
def new_capsa() -> Iterator[Callable[..., CapsaInstance]]:
    """Makes capsa instances of the test's own (not started), removed afterwards whatever state
    they are in: ``new_capsa(state_dir=None, **environment)``."""
    _require_root()
    made: list[CapsaInstance] = []

    def make(state_dir: Path | None = None, **environment: str) -> CapsaInstance:
        instance = CapsaInstance(state_dir)
        instance.env.update(environment)
        made.append(instance)
        return instance

    try:
        yield make
    finally:
        for instance in made:
            instance.cleanup()


@pytest.fixture
def private_capsa(new_capsa: Callable[..., CapsaInstance]) -> CapsaInstance:
    """A capsa instance of the test's own, for tests that kill or restart it."""
    return new_capsa()
