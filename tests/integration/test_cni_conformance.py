"""capsa's own CNI conformance suite, on the real kernel.

The installed capsa-cni launcher runs exactly as a runtime runs it (environment variables, the
network config on stdin, a CNI result or error object on stdout) and talks to the daemon, which
plugs veths into real netns on real bridges. The tests follow the CNI spec (SPEC.md 1.1.0) and
capsa's own promises, section by section:

1. Versions: VERSION, the result shape per cniVersion, a 1.1.0 caller's ``cniVersions``
2. Errors: CNI error objects with the spec's codes, on stdout, with a non-zero exit
3. ADD: plugging, ``prevResult``, an existing CNI_IFNAME, idempotence
4. CHECK against ``prevResult``, the port and the kernel
5. DEL is always safe, and a stale DEL leaves a capsule's new sandbox alone
6. A capsule's new sandbox replaces its old one, still plugged
7. GC (1.1.0) with ``cni.dev/valid-attachments``
8. STATUS (1.1.0)
9. The daemon's health, readiness and Prometheus metrics
10. A daemon killed in the middle of an ADD; leftovers of killed ADDs
11. 20 pods started at once through containerd
12. The data plane on its own
13. A capsule on two networks: one ADD plugs both, CHECK, DEL and GC handle both

Every test uses its own bridge, 10.x.y.0/24 subnet, netns, daemon socket and CNI network name,
and removes them in teardown, so runs side by side never meet. Run as a script, this file is the
daemon of section 10: ``python test_cni_conformance.py SOCKET PORTS_FILE [STEP MARKER]`` serves
capsa-cni-daemon on a file-backed port source and can stop at STEP of an ADD, to be killed there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import json
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from capsa.cni.daemon import CniDaemon
from capsa.cni.install import install_cni
from capsa.cni.protocol import SUPPORTED_VERSIONS, bridge_keeper
from capsa.config import CniConfig, Config
from capsa.cri import types as cri_types
from capsa.cri.client import CriClient
from capsa.files import atomic_write
from capsa.network import dataplane as dataplane_module
from capsa.network.dataplane import (
    Dataplane,
    DataplaneError,
    host_ifname,
    overlay_name,
    pod_ifnames,
)
from capsa.network.service import NetworkService, bridge_name
from capsa.network.types import PortBinding, PortSource
from capsa.runtime.host import HostRuntime
from capsa.store import Store

pytestmark = pytest.mark.integration

COMMAND_TIMEOUT = 30.0
REFERENCE_PLUGINS = Path("/usr/lib/cni")


# ---- the kernel, seen through iproute2 ----


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=check
    )


def ip_json(*args: str) -> list[dict[str, Any]]:
    run = sh("ip", "-j", *args, check=False)
    if run.returncode != 0:
        return []
    result: list[dict[str, Any]] = json.loads(run.stdout or "[]")
    return result


def sandbox_lo_up(host_end: str) -> bool:
    """Whether lo is up in the netns of a sandbox that containerd made, found by the peer of its
    host end (containerd names its netns under /run/netns)."""
    (link,) = ip_json("-d", "link", "show", "dev", host_end)
    names = {entry["nsid"]: entry.get("name") for entry in ip_json("netns", "list-id")}
    (lo,) = ip_json("-n", names[link["link_netnsid"]], "link", "show", "dev", "lo")
    return "UP" in lo["flags"]


def link_exists(name: str, netns: str | None = None) -> bool:
    where = ("-n", netns) if netns else ()
    return bool(ip_json(*where, "link", "show", "dev", name))


def off_the_network(host_end: str) -> bool:
    """Whether a host end passes nothing: its bridge port locked, flooding nothing to it, or the
    host end gone."""
    links = ip_json("-d", "link", "show", "dev", host_end)
    if not links:
        return True
    port = links[0].get("linkinfo", {}).get("info_slave_data", {})
    return port.get("locked") is True and not any(
        port.get(flood) for flood in ("flood", "mcast_flood", "bcast_flood")
    )


async def unplugged(container_id: str, netns: str | None = None) -> bool:
    """What a DEL promises: the pod is off the network when it answers, and its veth is gone
    soon after."""
    host_end = host_ifname(container_id, "eth0")
    if not off_the_network(host_end):
        return False
    return await gone_soon(host_end) and (netns is None or await gone_soon("eth0", netns))


async def gone_soon(name: str, netns: str | None = None) -> bool:
    """Whether the link goes within a few seconds: what a DEL deletes after its answer (its
    veths, then the bridges no pod is left on)."""
    for _ in range(100):
        if not link_exists(name, netns):
            return True
        await asyncio.sleep(0.05)
    return False


def ports_of(bridge: str) -> list[str]:
    """The interfaces attached to ``bridge``."""
    return [link["ifname"] for link in ip_json("link", "show", "master", bridge)]


def free_subnet() -> IPv4Network:
    """A random 10.x.y.0/24 that no address or route of this host overlaps."""
    used = [
        ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False)
        for link in ip_json("-4", "addr", "show")
        for a in link.get("addr_info", [])
    ]
    used += [
        ipaddress.ip_network(r["dst"])
        for r in ip_json("-4", "route", "show")
        if r.get("dst", "default") != "default"
    ]
    for _ in range(100):
        subnet = IPv4Network(f"10.{random.randint(64, 250)}.{random.randint(0, 255)}.0/24")
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise RuntimeError("no free 10.x.y.0/24 on this host")


def netns_path(name: str) -> str:
    return f"/run/netns/{name}"


def pod_state(netns: str, ifname: str = "eth0") -> dict[str, Any]:
    (link,) = ip_json("-n", netns, "link", "show", "dev", ifname)
    (addr,) = ip_json("-n", netns, "-4", "addr", "show", "dev", ifname)
    (lo,) = ip_json("-n", netns, "link", "show", "dev", "lo")
    default_routes = ip_json("-n", netns, "route", "show", "default")
    return {
        "mac": link["address"],
        "mtu": link["mtu"],
        "up": "UP" in link["flags"],
        "lo_up": "UP" in lo["flags"],
        "addresses": [f"{a['local']}/{a['prefixlen']}" for a in addr["addr_info"]],
        "default_via": [(r.get("gateway"), r.get("dev")) for r in default_routes],
    }


def bridge_addresses(bridge: str) -> list[str]:
    return [
        f"{a['local']}/{a['prefixlen']}"
        for link in ip_json("-4", "addr", "show", "dev", bridge)
        for a in link["addr_info"]
    ]


async def reachable(address: IPv4Address) -> bool:
    process = await asyncio.create_subprocess_exec(
        "busybox", "ping", "-c1", "-W2", str(address),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    return await asyncio.wait_for(process.wait(), COMMAND_TIMEOUT) == 0


# ---- ports: a PortSource in a file, shared with a daemon in another process ----


class FilePorts:
    """A PortSource kept in a JSON file: a daemon in another process, and its successor after a
    kill, see the same ports and bindings as the test. ports_unbound forgets only its own
    container's bindings, as the store does.

    ``pause_at`` names a step ("find_ports" or "ports_bound") at which the source writes the step
    to ``marker`` and then never returns: the daemon is to be killed there.
    """

    def __init__(self, path: Path, pause_at: str = "", marker: Path | None = None) -> None:
        self.path = path
        self.pause_at = pause_at
        self.marker = marker
        # The daemon's threads read and write the file at the same time.
        self._guard = threading.Lock()
        if not path.exists():
            self._save({"ports": {}, "bound": {}})

    def add(self, pod: str, *ports: PortBinding) -> None:
        """The pod's ports, in its interface order."""
        with self._guard:
            state = self._load()
            state["ports"][pod] = [
                {**dataclasses.asdict(port), "ip": str(port.ip), "gateway": str(port.gateway)}
                for port in ports
            ]
            self._save(state)

    @property
    def bound(self) -> dict[str, str]:
        """Port id -> the container id bound to it."""
        return {port_id: cid for port_id, (cid, _) in self._load()["bound"].items()}

    async def bound_soon(self, expected: dict[str, str]) -> dict[str, str]:
        """The bindings once they are ``expected`` (an ADD records them after its answer), or
        as they are when the wait ends."""
        deadline = time.monotonic() + COMMAND_TIMEOUT
        bound = self.bound
        while bound != expected and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            bound = self.bound
        return bound

    def find_ports(self, pod_name: str) -> list[PortBinding]:
        self._pause("find_ports")
        with self._guard:
            state = self._load()
        found = []
        for fields in state["ports"].get(pod_name, []):
            container_id, host_name = state["bound"].get(fields["port_id"], (None, None))
            found.append(
                PortBinding(
                    **{
                        **fields,
                        "ip": IPv4Interface(fields["ip"]),
                        "gateway": IPv4Address(fields["gateway"]),
                        "bound_container_id": container_id,
                        "bound_host_ifname": host_name,
                    }
                )
            )
        return found

    def bindings_of(self, port_ids: Sequence[str]) -> dict[str, tuple[str, str] | None]:
        with self._guard:
            state = self._load()
        known = {fields["port_id"] for ports in state["ports"].values() for fields in ports}
        return {
            port_id: tuple(state["bound"][port_id]) if port_id in state["bound"] else None
            for port_id in port_ids
            if port_id in known
        }

    def ports_bound(self, container_id: str, host_ifnames: dict[str, str]) -> None:
        self._pause("ports_bound")
        with self._guard:
            state = self._load()
            for port_id, host_name in host_ifnames.items():
                state["bound"][port_id] = [container_id, host_name]
            self._save(state)

    def ports_unbound(self, port_ids: Sequence[str], container_id: str) -> None:
        with self._guard:
            state = self._load()
            for port_id in port_ids:
                if state["bound"].get(port_id, [None])[0] == container_id:
                    del state["bound"][port_id]
            self._save(state)

    def pod_unbound(self, pod_name: str, container_id: str) -> list[str]:
        with self._guard:
            state = self._load()
            unbound = [
                fields["port_id"]
                for fields in state["ports"].get(pod_name, [])
                if state["bound"].get(fields["port_id"], [None])[0] == container_id
            ]
            for port_id in unbound:
                del state["bound"][port_id]
            self._save(state)
        return unbound

    def _pause(self, step: str) -> None:
        if step == self.pause_at and self.marker is not None:
            self.marker.write_text(step)
            time.sleep(3600)

    def _load(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.path.read_text())
        return state

    def _save(self, state: dict[str, Any]) -> None:
        atomic_write(self.path, json.dumps(state))


@dataclass
class Network:
    """A test network: its bridge, its subnet and the ports of its pods."""

    bridge: str
    subnet: IPv4Network
    ports: FilePorts
    mtu: int = 1400
    pods: int = 0

    @property
    def gateway(self) -> IPv4Address:
        return self.subnet.network_address + 1

    def add_pod(self) -> tuple[str, PortBinding]:
        pod = str(uuid.uuid4())
        port = self.new_port()
        self.ports.add(pod, port)
        return pod, port

    def new_port(self) -> PortBinding:
        """A port on this network, for a pod to be added to ``ports``."""
        self.pods += 1
        return PortBinding(
            port_id=f"port-{uuid.uuid4()}",
            network_id="net-test",
            mac=f"fa:16:3e:{secrets.token_hex(1)}:{secrets.token_hex(1)}:{self.pods:02x}",
            ip=IPv4Interface(f"{self.subnet.network_address + 10 + self.pods}/24"),
            gateway=self.gateway,
            bridge=self.bridge,
            mtu=self.mtu,
        )


# ---- the runtime side: the installed launcher, run as libcni runs it ----


@dataclass
class Outcome:
    """What one plugin run printed and how it exited."""

    status: int
    output: Any

    @property
    def error(self) -> dict[str, Any]:
        """The CNI error object, checked to be one."""
        assert self.status != 0, self.output
        assert isinstance(self.output, dict), self.output
        assert set(self.output) == {"cniVersion", "code", "msg", "details"}, self.output
        return self.output


@dataclass
class Cni:
    """Runs the installed capsa-cni launcher exactly as libcni does.

    ``conflist`` is the network configuration list as installed; each call derives the plugin's
    request config from it as libcni does (SPEC.md section 3): the plugin object plus the list's
    ``name`` and the ``cniVersion`` the runtime selects (the highest of ``cniVersion`` and
    ``cniVersions``), ``prevResult`` and, for GC, ``cni.dev/valid-attachments``.
    """

    launcher: Path
    conflist: dict[str, Any]
    # Where the launcher reaches the daemon.
    address: str
    container_ids: list[str] = field(default_factory=list)

    def selected_version(self) -> str:
        versions = [self.conflist["cniVersion"], *self.conflist.get("cniVersions", [])]
        return max(versions, key=lambda v: tuple(int(p) for p in v.split(".")))

    def plugin_conf(self, **changes: Any) -> dict[str, Any]:
        (plugin,) = self.conflist["plugins"]
        conf = {k: v for k, v in plugin.items() if k != "capabilities"}
        conf.update(name=self.conflist["name"], cniVersion=self.selected_version())
        conf.update(changes)
        return {k: v for k, v in conf.items() if v is not None}

    async def run(
        self,
        command: str,
        container_id: str = "",
        netns: str = "",
        pod: str = "",
        ifname: str = "eth0",
        conf: dict[str, Any] | None = None,
        stdin: bytes | None = None,
        **environment: str | None,
    ) -> Outcome:
        """One plugin run; ``environment`` overrides variables (None removes one)."""
        if container_id:
            self.container_ids.append(container_id)
        args = [
            "IgnoreUnknown=1",
            "K8S_POD_NAMESPACE=default",
            f"K8S_POD_NAME={pod}",
            f"K8S_POD_INFRA_CONTAINER_ID={container_id}",
            f"K8S_POD_UID={secrets.token_hex(8)}",
        ]
        # containerd passes them in a different order on every call.
        random.shuffle(args)
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": ifname if container_id else "",
            "CNI_ARGS": ";".join(args) if pod else "",
            "CNI_PATH": str(self.launcher.parent),
            **environment,
        }
        config = conf if conf is not None else self.plugin_conf()
        process = await asyncio.create_subprocess_exec(
            str(self.launcher),
            env={k: v for k, v in env.items() if v is not None},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(
            process.communicate(stdin if stdin is not None else json.dumps(config).encode()),
            COMMAND_TIMEOUT,
        )
        assert not stderr, stderr
        assert process.returncode is not None
        return Outcome(process.returncode, json.loads(stdout) if stdout.strip() else None)

    async def add(
        self, container_id: str, netns: str, pod: str, **conf_changes: Any
    ) -> dict[str, Any]:
        """A successful ADD's result."""
        outcome = await self.run(
            "ADD", container_id, netns, pod, conf=self.plugin_conf(**conf_changes)
        )
        assert outcome.status == 0, outcome.output
        assert isinstance(outcome.output, dict)
        return outcome.output

    async def delete(self, container_id: str, netns: str, pod: str, **conf_changes: Any) -> None:
        outcome = await self.run(
            "DEL", container_id, netns, pod, conf=self.plugin_conf(**conf_changes)
        )
        assert (outcome.status, outcome.output) == (0, None), outcome.output

    async def check(
        self, container_id: str, netns: str, pod: str, prev_result: dict[str, Any] | None
    ) -> Outcome:
        return await self.run(
            "CHECK", container_id, netns, pod, conf=self.plugin_conf(prevResult=prev_result)
        )

    async def gc(self, *valid: tuple[str, str], **conf_changes: Any) -> Outcome:
        attachments = [{"containerID": cid, "ifname": ifname} for cid, ifname in valid]
        conf = self.plugin_conf(
            **{"cniVersion": "1.1.0", "cni.dev/valid-attachments": attachments, **conf_changes}
        )
        return await self.run("GC", conf=conf)

    def remove_veths(self) -> None:
        for container_id in self.container_ids:
            for name in pod_ifnames("eth0", 2):
                sh("ip", "link", "del", host_ifname(container_id, name), check=False)


def install(directory: Path, daemon_address: str) -> Cni:
    """capsa's launcher and conflist in ``directory``, for the daemon at ``daemon_address``."""
    cfg = Config(
        state_dir=directory,
        cni=CniConfig(
            daemon_listen=daemon_address, network_name=f"capsa-ct-{secrets.token_hex(4)}"
        ),
    )
    install_cni(cfg)
    conflist = json.loads((cfg.cni_conf_dir / "10-capsa.conflist").read_text())
    return Cni(cfg.cni_bin_dir / "capsa-cni", conflist, cfg.cni_daemon_address)


# ---- fixtures ----


@pytest.fixture
def work_dir() -> Iterator[Path]:
    """A short directory of the test's own: unix socket paths must stay under 108 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="capsa-ct-", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def network(work_dir: Path) -> Iterator[Network]:
    net = Network(
        bridge=f"capsat{secrets.token_hex(4)}",
        subnet=free_subnet(),
        ports=FilePorts(work_dir / "ports.json"),
    )
    try:
        yield net
    finally:
        sh("ip", "link", "del", net.bridge, check=False)


@pytest.fixture
def second_network(network: Network) -> Iterator[Network]:
    """Another network whose ports the same source keeps: a capsule may join both."""
    subnet = free_subnet()
    while subnet == network.subnet:
        subnet = free_subnet()
    net = Network(
        bridge=f"capsat{secrets.token_hex(4)}", subnet=subnet, ports=network.ports, mtu=1300
    )
    try:
        yield net
    finally:
        sh("ip", "link", "del", net.bridge, check=False)


@pytest.fixture
def make_netns() -> Iterator[Callable[[], str]]:
    made: list[str] = []

    def make() -> str:
        name = f"capsa-t-{secrets.token_hex(5)}"
        sh("ip", "netns", "add", name)
        made.append(name)
        return name

    try:
        yield make
    finally:
        for name in made:
            sh("ip", "netns", "del", name, check=False)


StartCni = Callable[[PortSource], Awaitable[Cni]]


@pytest.fixture
async def start_cni(work_dir: Path) -> AsyncIterator[StartCni]:
    """Starts a CniDaemon on ``ports`` (a socket of its own) and installs a launcher for it;
    stops them all and removes their veths afterwards."""
    daemons: list[CniDaemon] = []
    runners: list[Cni] = []

    async def start(ports: PortSource) -> Cni:
        name = f"d{len(daemons)}"
        daemon = CniDaemon(ports, f"unix:{work_dir / name}.sock")
        await daemon.start()
        daemons.append(daemon)
        runner = install(work_dir / name, daemon.address)
        runners.append(runner)
        return runner

    try:
        yield start
    finally:
        for runner in runners:
            runner.remove_veths()
        for daemon in daemons:
            await daemon.stop()


@pytest.fixture
async def cni(start_cni: StartCni, network: Network) -> Cni:
    return await start_cni(network.ports)


@dataclass
class StoreNetwork:
    """capsa's NetworkService on a real store: ports and bindings as capsa keeps them."""

    service: NetworkService
    store: Store
    bridge: str

    async def add_pod(self) -> tuple[str, PortBinding]:
        pod = str(uuid.uuid4())
        await self.service.allocate_ports(pod, "project-ct", "host-ct")
        [port] = await asyncio.to_thread(self.service.find_ports, pod)
        return pod, port

    async def binding(self, pod: str) -> str | None:
        [port] = await self.store.ports.list_for_device(pod)
        return port.binding_container_id


@pytest.fixture
async def store_network(work_dir: Path) -> AsyncIterator[StoreNetwork]:
    store = Store(f"sqlite:///{work_dir / 'capsa.db'}")
    await store.open()
    service = NetworkService(store, str(free_subnet()), 1400)
    network = (await service.project_defaults("project-ct")).network
    try:
        yield StoreNetwork(service, store, bridge_name(network.id))
    finally:
        await store.close()
        sh("ip", "link", "del", bridge_name(network.id), check=False)


def plugged_ends(cni: Cni, network_bridge: str) -> list[str]:
    """The host ends of ``cni``'s attachments on the bridge."""
    names = {host_ifname(cid, "eth0") for cid in cni.container_ids}
    return [name for name in ports_of(network_bridge) if name in names]


# ==== 1. Versions: VERSION, the result shape per cniVersion, cniVersions ====


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
async def test_version_echoes_the_version_and_lists_all_supported(cni: Cni, version: str) -> None:
    outcome = await cni.run("VERSION", stdin=json.dumps({"cniVersion": version}).encode())
    assert outcome.status == 0
    assert outcome.output == {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}
    assert {"0.3.1", "0.4.0", "1.0.0", "1.1.0"} <= set(outcome.output["supportedVersions"])


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
async def test_result_shape_follows_the_conf_version(
    cni: Cni, network: Network, make_netns: Callable[[], str], version: str
) -> None:
    pod, port = network.add_pod()
    netns = netns_path(make_netns())
    container_id = secrets.token_hex(32)

    result = await cni.add(container_id, netns, pod, cniVersion=version)

    assert result["cniVersion"] == version
    assert [i["name"] for i in result["interfaces"]] == [
        network.bridge,
        host_ifname(container_id, "eth0"),
        "eth0",
    ]
    (ip,) = result["ips"]
    assert ip["address"] == str(port.ip)
    assert result["interfaces"][ip["interface"]]["sandbox"] == netns
    # 0.3.x and 0.4.0 name each address's IP version; 1.0.0 dropped it; 1.1.0 adds the MTUs.
    assert ip.get("version") == ("4" if version in ("0.3.1", "0.4.0") else None)
    assert [i.get("mtu") for i in result["interfaces"]] == (
        [network.mtu] * 3 if version == "1.1.0" else [None] * 3
    )
    await cni.delete(container_id, netns, pod, cniVersion=version, prevResult=result)
    assert await unplugged(container_id)


async def test_a_1_1_0_conflist_with_cni_versions_is_served_at_1_1_0(
    start_cni: StartCni, network: Network, make_netns: Callable[[], str]
) -> None:
    # What a CNI 1.1.0 runtime reads: cniVersion for old runtimes, cniVersions for new ones.
    cni = await start_cni(network.ports)
    cni.conflist["cniVersions"] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"]
    assert cni.selected_version() == "1.1.0"
    pod, port = network.add_pod()
    netns_name = make_netns()
    netns = netns_path(netns_name)
    container_id = secrets.token_hex(32)

    result = await cni.add(container_id, netns, pod)
    check = await cni.check(container_id, netns, pod, result)
    status = await cni.run("STATUS")
    gc = await cni.gc((container_id, "eth0"))

    assert result["cniVersion"] == "1.1.0"
    assert (check.status, status.status, gc.status) == (0, 0, 0), (check, status, gc)
    assert pod_state(netns_name)["addresses"] == [str(port.ip)]
    await cni.delete(container_id, netns, pod, prevResult=result)
    assert await unplugged(container_id)


def test_the_installed_conflist_stays_at_1_0_0_for_containerd_1_6(work_dir: Path) -> None:
    # containerd 1.6 refuses a conflist at 1.1.0 or with cniVersions.
    conflist = install(work_dir, "unix:/run/capsa-ct.sock").conflist
    assert conflist["cniVersion"] == "1.0.0"
    assert "cniVersions" not in conflist
    assert conflist["plugins"][0]["capabilities"] == {"portMappings": True}


# ==== 2. Errors: CNI error objects with the spec's codes, on stdout, non-zero exit ====

# In a case's environment or conf: the variable or key is left out.
_ABSENT = None


@dataclass(frozen=True)
class ErrorCase:
    command: str = "ADD"
    environment: dict[str, str | None] = field(default_factory=dict)
    conf: dict[str, Any] = field(default_factory=dict)
    stdin: bytes | None = None
    unknown_pod: bool = False
    # What the message must name (besides the variables of ``environment``).
    says: tuple[str, ...] = ()


ERROR_CASES = {
    # 4: invalid or missing environment; the message names the variable.
    "ADD without CNI_CONTAINERID": (ErrorCase(environment={"CNI_CONTAINERID": _ABSENT}), 4),
    "ADD without CNI_NETNS": (ErrorCase(environment={"CNI_NETNS": _ABSENT}), 4),
    "ADD without CNI_IFNAME": (ErrorCase(environment={"CNI_IFNAME": _ABSENT}), 4),
    "DEL without CNI_CONTAINERID": (
        ErrorCase("DEL", environment={"CNI_CONTAINERID": _ABSENT}),
        4,
    ),
    "CHECK without CNI_NETNS": (ErrorCase("CHECK", environment={"CNI_NETNS": _ABSENT}), 4),
    "GC without CNI_PATH": (
        ErrorCase("GC", environment={"CNI_PATH": _ABSENT}, conf={"cniVersion": "1.1.0"}),
        4,
    ),
    "unknown CNI_COMMAND": (ErrorCase("UPDATE", says=("CNI_COMMAND", "UPDATE")), 4),
    "invalid CNI_CONTAINERID": (ErrorCase(environment={"CNI_CONTAINERID": "-bad id"}), 4),
    "unusable CNI_IFNAME": (ErrorCase(environment={"CNI_IFNAME": "eth0/with/slash"}), 4),
    "CNI_NETNS that does not exist": (
        ErrorCase(environment={"CNI_NETNS": "/run/netns/capsa-ct-missing"}),
        4,
    ),
    # 6: the config cannot be decoded.
    "config not JSON": (ErrorCase(stdin=b'{"cniVersion": "1.0.0",'), 6),
    "config not an object": (ErrorCase(stdin=b'["cniVersion"]'), 6),
    # 7: invalid network config.
    "no network name": (ErrorCase(conf={"name": _ABSENT}, says=("name",)), 7),
    "prevResult not an object": (ErrorCase(conf={"prevResult": ["x"]}), 7),
    # 2: unsupported field; the message names key and value.
    "ipam": (ErrorCase(conf={"ipam": {"type": "host-local"}}, says=("ipam", "host-local")), 2),
    "runtimeConfig.mac": (
        ErrorCase(
            conf={"runtimeConfig": {"mac": "02:00:00:00:00:99"}},
            says=("mac", "02:00:00:00:00:99"),
        ),
        2,
    ),
    # 1: incompatible version.
    "cniVersion 0.2.0": (ErrorCase(conf={"cniVersion": "0.2.0"}), 1),
    "no cniVersion": (ErrorCase(conf={"cniVersion": _ABSENT}), 1),
    "CHECK at 0.3.1": (
        ErrorCase("CHECK", conf={"cniVersion": "0.3.1", "prevResult": {}}, says=("CHECK",)),
        1,
    ),
    "GC at 1.0.0": (ErrorCase("GC", conf={"cni.dev/valid-attachments": []}, says=("GC",)), 1),
    "STATUS at 1.0.0": (ErrorCase("STATUS", says=("STATUS",)), 1),
    # 3: the container is unknown: no capsule port for this sandbox.
    "ADD for a sandbox without port": (ErrorCase(unknown_pod=True), 3),
}


@pytest.mark.parametrize(("case", "code"), list(ERROR_CASES.values()), ids=list(ERROR_CASES))
async def test_errors_are_cni_error_objects_with_the_spec_code(
    cni: Cni, network: Network, make_netns: Callable[[], str], case: ErrorCase, code: int
) -> None:
    pod, _ = network.add_pod()
    container_id = secrets.token_hex(32)
    conf = cni.plugin_conf(**{"cniVersion": "1.0.0", **case.conf})
    outcome = await cni.run(
        case.command,
        container_id,
        netns_path(make_netns()),
        str(uuid.uuid4()) if case.unknown_pod else pod,
        conf=conf,
        stdin=case.stdin,
        **case.environment,
    )
    error = outcome.error
    assert error["code"] == code, error
    assert error["cniVersion"] == conf.get("cniVersion", "1.0.0")
    for variable, value in case.environment.items():
        assert variable in error["msg"], error
        assert not value or value in error["msg"], error
    for text in case.says:
        assert text in error["msg"], error
    assert not link_exists(host_ifname(container_id, "eth0"))
    assert network.ports.bound == {}


async def test_unreachable_daemon_is_try_again_later_and_status_not_available(
    work_dir: Path,
) -> None:
    # Nobody listens on this socket: capsa is down.
    cni = install(work_dir, f"unix:{work_dir / 'nobody.sock'}")
    add = await cni.run("ADD", secrets.token_hex(8), "/run/netns/x", str(uuid.uuid4()))
    status = await cni.run("STATUS", conf=cni.plugin_conf(cniVersion="1.1.0"))
    assert add.error["code"] == 11
    assert status.error["code"] == 50
    for error in (add.error, status.error):
        assert cni.address in error["msg"]
        assert "capsa up" in error["details"]


# ==== 3. ADD ====


async def test_add_plugs_the_pod(cni: Cni, network: Network, make_netns: Callable[[], str]) -> None:
    pod, port = network.add_pod()
    netns = make_netns()
    container_id = secrets.token_hex(32)

    result = await cni.add(container_id, netns_path(netns), pod)

    bridge, host_end, pod_end = result["interfaces"]
    assert bridge["name"] == network.bridge
    assert host_end["name"] == host_ifname(container_id, "eth0")
    assert pod_end == {"name": "eth0", "mac": port.mac, "sandbox": netns_path(netns)}
    assert result["ips"] == [
        {"address": str(port.ip), "gateway": str(network.gateway), "interface": 2}
    ]
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": str(network.gateway)}]
    assert pod_state(netns) == {
        "mac": port.mac,
        "mtu": network.mtu,
        "up": True,
        # The pod's lo is the runtime's (containerd runs the loopback plugin): left as it was.
        "lo_up": False,
        "addresses": [str(port.ip)],
        "default_via": [(str(network.gateway), "eth0")],
    }
    (host_link,) = ip_json("link", "show", "dev", host_end["name"])
    assert host_link["master"] == network.bridge
    assert host_link["mtu"] == network.mtu
    assert bridge_addresses(network.bridge) == [f"{network.gateway}/24"]
    (bridge_link,) = ip_json("link", "show", "dev", network.bridge)
    # The bridge keeps its own MAC instead of adopting its port's.
    assert bridge_link["address"] == bridge["mac"] != host_link["address"]
    expected = {port.port_id: container_id}
    assert await network.ports.bound_soon(expected) == expected
    assert await reachable(port.ip.ip)


async def test_add_appends_its_result_to_prev_result(
    cni: Cni, network: Network, make_netns: Callable[[], str]
) -> None:
    pod, port = network.add_pod()
    netns = netns_path(make_netns())
    # What a plugin before capsa-cni in the chain returned.
    prev = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "dummy0", "mac": "02:00:00:00:00:aa", "sandbox": netns}],
        "ips": [{"address": "192.0.2.10/24", "interface": 0}],
        "routes": [{"dst": "192.0.2.0/24"}],
        "dns": {"nameservers": ["192.0.2.53"]},
    }

    result = await cni.add(secrets.token_hex(32), netns, pod, prevResult=prev)

    assert result["interfaces"][0] == prev["interfaces"][0]
    assert [i["name"] for i in result["interfaces"][1:]][-1] == "eth0"
    assert result["ips"][0] == prev["ips"][0]
    assert result["ips"][1] == {
        "address": str(port.ip),
        "gateway": str(network.gateway),
        "interface": 3,
    }
    assert result["routes"][0] == prev["routes"][0]
    assert result["dns"] == prev["dns"]


@pytest.mark.parametrize(
    "owner_of_eth0", ["another capsule", "the same capsule's other sandbox", "someone else"]
)
async def test_add_fails_when_the_ifname_exists_in_the_netns(
    cni: Cni, network: Network, make_netns: Callable[[], str], owner_of_eth0: str
) -> None:
    pod, port = network.add_pod()
    netns = make_netns()
    first = secrets.token_hex(32)
    if owner_of_eth0 == "someone else":
        sh("ip", "-n", netns, "link", "add", "eth0", "type", "bridge")
        second_pod = pod
    else:
        await cni.add(first, netns_path(netns), pod)
        second_pod = pod if owner_of_eth0 == "the same capsule's other sandbox" else None
        second_pod = second_pod or network.add_pod()[0]

    second = secrets.token_hex(32)
    outcome = await cni.run("ADD", second, netns_path(netns), second_pod)

    assert outcome.error["code"] == 4
    assert "CNI_IFNAME" in outcome.error["msg"]
    assert "eth0 already exists" in outcome.error["msg"]
    assert not link_exists(host_ifname(second, "eth0"))
    if owner_of_eth0 != "someone else":
        # The attachment that holds eth0 stays, even the one the failed ADD would replace.
        assert await network.ports.bound_soon({port.port_id: first}) == {port.port_id: first}
        assert await reachable(port.ip.ip)


async def test_add_again_for_the_same_attachment_returns_it(
    cni: Cni, network: Network, make_netns: Callable[[], str]
) -> None:
    pod, port = network.add_pod()
    netns = make_netns()
    container_id = secrets.token_hex(32)
    first = await cni.add(container_id, netns_path(netns), pod)

    again = await cni.add(container_id, netns_path(netns), pod)

    assert again == first
    assert plugged_ends(cni, network.bridge) == [host_ifname(container_id, "eth0")]
    assert pod_state(netns)["addresses"] == [str(port.ip)]
    assert await reachable(port.ip.ip)


# ==== 4. CHECK ====


async def test_check_passes_after_add(
    cni: Cni, network: Network, make_netns: Callable[[], str]
) -> None:
    pod, _ = network.add_pod()
    netns = netns_path(make_netns())
    container_id = secrets.token_hex(32)
    result = await cni.add(container_id, netns, pod)
    assert await cni.check(container_id, netns, pod, result) == Outcome(0, None)


@pytest.mark.parametrize(
    ("breakage", "problem"),
    [
        (("addr", "flush", "dev", "eth0"), "eth0 lacks"),
        (("route", "del", "default"), "no default route"),
        (("link", "set", "eth0", "down"), "eth0 is down"),
        (("link", "set", "eth0", "address", "02:00:00:00:00:01"), "MAC 02:00:00:00:00:01"),
    ],
)
async def test_check_names_what_the_kernel_lacks(
    cni: Cni,
    network: Network,
    make_netns: Callable[[], str],
    breakage: tuple[str, ...],
    problem: str,
) -> None:
    pod, _ = network.add_pod()
    netns = make_netns()
    container_id = secrets.token_hex(32)
    result = await cni.add(container_id, netns_path(netns), pod)
    sh("ip", "-n", netns, *breakage)

    outcome = await cni.check(container_id, netns_path(netns), pod, result)

    assert problem in outcome.error["msg"], outcome.error


async def test_check_names_where_prev_result_disagrees(
    cni: Cni, network: Network, make_netns: Callable[[], str]
) -> None:
    pod, port = network.add_pod()
    netns = netns_path(make_netns())
    container_id = secrets.token_hex(32)
    result = await cni.add(container_id, netns, pod)
    result["ips"][0]["address"] = "10.9.9.9/24"

    outcome = await cni.check(container_id, netns, pod, result)

    assert "10.9.9.9/24" in outcome.error["msg"]
    assert str(port.ip) in outcome.error["msg"]


async def test_check_without_prev_result_is_code_7(
    cni: Cni, network: Network, make_netns: Callable[[], str]
) -> None:
    pod, _ = network.add_pod()
    netns = netns_path(make_netns())
    container_id = secrets.token_hex(32)
    await cni.add(container_id, netns, pod)
    outcome = await cni.check(container_id, netns, pod, None)
    assert outcome.error["code"] == 7
    assert "prevResult" in outcome.error["msg"]


# ==== 5. DEL is always safe ====


async def test_del_removes_the_veth_the_binding_and_the_unused_bridge(
    cni: Cni, network: Network, make_netns: Callable[[], str]
) -> None:
    pod, _ = network.add_pod()
    netns = make_netns()
    container_id = secrets.token_hex(32)
    result = await cni.add(container_id, netns_path(netns), pod)

    await cni.delete(container_id, netns_path(netns), pod, prevResult=result)

    assert await unplugged(container_id, netns)
    assert await gone_soon(network.bridge)
    assert network.ports.bound == {}


async def test_del_succeeds_whatever_is_left(
    cni: Cni, network: Network, make_netns: Callable[[], str]
) -> None:
    pod, _ = network.add_pod()
    netns = make_netns()
    container_id = secrets.token_hex(32)
    result = await cni.add(container_id, netns_path(netns), pod)
    await cni.delete(container_id, netns_path(netns), pod, prevResult=result)

    # Again, with and without prevResult.
    await cni.delete(container_id, netns_path(netns), pod, prevResult=result)
    await cni.delete(container_id, netns_path(netns), pod)
    # With an empty CNI_NETNS, as containerd sends once the netns is gone.
    await cni.delete(container_id, "", pod)
    # With a stale CNI_NETNS: the path of a netns that no longer exists.
    sh("ip", "netns", "del", netns)
    await cni.delete(container_id, netns_path(netns), pod)
    # For a sandbox the daemon never saw, of a capsule without port, without K8S_POD_NAME.
    await cni.delete(secrets.token_hex(32), "", pod)
    await cni.delete(secrets.token_hex(32), "", str(uuid.uuid4()))
    assert (await cni.run("DEL", secrets.token_hex(32))).status == 0
    assert network.ports.bound == {}


async def test_del_of_a_plugged_pod_whose_netns_is_gone(
    cni: Cni, network: Network, make_netns: Callable[[], str]
) -> None:
    pod, _ = network.add_pod()
    other_pod, other_port = network.add_pod()
    netns, other_netns = make_netns(), make_netns()
    container_id, other = secrets.token_hex(32), secrets.token_hex(32)
    await cni.add(container_id, netns_path(netns), pod)
    await cni.add(other, netns_path(other_netns), other_pod)
    sh("ip", "netns", "del", netns)

    await cni.delete(container_id, "", pod)

    assert await unplugged(container_id)
    expected = {other_port.port_id: other}
    assert await network.ports.bound_soon(expected) == expected
    # The bridge stays for the other pod.
    assert await reachable(other_port.ip.ip)


async def test_stale_del_leaves_the_new_sandbox_and_its_binding_in_the_store(
    start_cni: StartCni, store_network: StoreNetwork, make_netns: Callable[[], str]
) -> None:
    # containerd's retry after a failed sandbox: same capsule, new container id and netns; the
    # old sandbox's DEL comes late.
    cni = await start_cni(store_network.service)
    pod, port = await store_network.add_pod()
    old_netns, new_netns = make_netns(), make_netns()
    old, new = secrets.token_hex(32), secrets.token_hex(32)
    await cni.add(old, netns_path(old_netns), pod)
    await cni.delete(old, netns_path(old_netns), pod)
    await cni.add(new, netns_path(new_netns), pod)

    await cni.delete(old, netns_path(old_netns), pod)
    await cni.delete(old, "", pod)

    assert link_exists(host_ifname(new, "eth0"))
    assert pod_state(new_netns)["addresses"] == [str(port.ip)]
    assert await store_network.binding(pod) == new
    assert await reachable(port.ip.ip)


# ==== 6. A capsule's new sandbox replaces its old one, still plugged ====


async def test_new_sandbox_of_a_plugged_capsule_unplugs_the_old_one(
    start_cni: StartCni, store_network: StoreNetwork, make_netns: Callable[[], str]
) -> None:
    # The old sandbox is being replaced (its DEL may come late or never): capsa unplugs it
    # rather than put the port's address and MAC on the bridge twice.
    cni = await start_cni(store_network.service)
    pod, port = await store_network.add_pod()
    old_netns, new_netns = make_netns(), make_netns()
    old, new = secrets.token_hex(32), secrets.token_hex(32)
    await cni.add(old, netns_path(old_netns), pod)

    await cni.add(new, netns_path(new_netns), pod)

    assert ports_of(store_network.bridge) == [host_ifname(new, "eth0")]
    assert not link_exists("eth0", old_netns)
    assert pod_state(new_netns)["addresses"] == [str(port.ip)]
    assert await store_network.binding(pod) == new
    assert await reachable(port.ip.ip)
    # The old sandbox's DEL, when it comes, changes nothing.
    await cni.delete(old, netns_path(old_netns), pod)
    assert ports_of(store_network.bridge) == [host_ifname(new, "eth0")]
    assert await store_network.binding(pod) == new
    await cni.delete(new, netns_path(new_netns), pod)
    assert await store_network.binding(pod) is None
    assert await gone_soon(store_network.bridge)


# ==== 7. GC (1.1.0) ====


async def test_gc_removes_only_its_own_attachments_the_runtime_no_longer_has(
    start_cni: StartCni, network: Network, work_dir: Path, make_netns: Callable[[], str]
) -> None:
    cni = await start_cni(network.ports)
    # Another capsa instance on this machine: its own daemon, its own network.
    other_network = Network(
        bridge=f"capsat{secrets.token_hex(4)}",
        subnet=free_subnet(),
        ports=FilePorts(work_dir / "other-ports.json"),
    )
    try:
        other_cni = await start_cni(other_network.ports)
        (kept_pod, kept_port), (stale_pod, _) = network.add_pod(), network.add_pod()
        other_pod, other_port = other_network.add_pod()
        kept, stale, other = (secrets.token_hex(32) for _ in range(3))
        stale_netns = make_netns()
        await cni.add(kept, netns_path(make_netns()), kept_pod)
        await cni.add(stale, netns_path(stale_netns), stale_pod)
        await other_cni.add(other, netns_path(make_netns()), other_pod)

        outcome = await cni.gc((kept, "eth0"), (secrets.token_hex(32), "eth0"))

        assert outcome == Outcome(0, None)
        assert not link_exists(host_ifname(stale, "eth0"))
        assert not link_exists("eth0", stale_netns)
        expected = {kept_port.port_id: kept}
        assert await network.ports.bound_soon(expected) == expected
        assert ports_of(network.bridge) == [host_ifname(kept, "eth0")]
        assert await reachable(kept_port.ip.ip)
        # The other instance's attachment is not this GC's to judge.
        assert link_exists(host_ifname(other, "eth0"))
        expected = {other_port.port_id: other}
        assert await other_network.ports.bound_soon(expected) == expected
        assert await reachable(other_port.ip.ip)

        # Nothing valid any more: the last attachment goes, and the bridge with it.
        assert await cni.gc() == Outcome(0, None)
        assert not link_exists(network.bridge)
        assert network.ports.bound == {}
    finally:
        sh("ip", "link", "del", other_network.bridge, check=False)


# ==== 8. STATUS (1.1.0) ====


async def test_status_of_a_ready_daemon_is_silent_success(cni: Cni) -> None:
    assert await cni.run("STATUS", conf=cni.plugin_conf(cniVersion="1.1.0")) == Outcome(0, None)


async def test_status_of_a_daemon_that_cannot_bind_is_code_50(
    start_cni: StartCni, network: Network, monkeypatch: pytest.MonkeyPatch
) -> None:
    reason = "the daemon lacks CAP_NET_ADMIN: run capsa as root"
    monkeypatch.setattr("capsa.cni.daemon._lacks_net_admin", lambda: reason)
    cni = await start_cni(network.ports)
    outcome = await cni.run("STATUS", conf=cni.plugin_conf(cniVersion="1.1.0"))
    assert outcome.error["code"] == 50
    assert reason in outcome.error["msg"]


# ==== 9. The daemon's health, readiness and metrics ====


async def test_daemon_serves_health_readiness_and_prometheus_metrics(
    cni: Cni, network: Network, make_netns: Callable[[], str]
) -> None:
    pod, _ = network.add_pod()
    netns = netns_path(make_netns())
    container_id = secrets.token_hex(32)
    await cni.add(container_id, netns, pod)
    await cni.run("ADD", secrets.token_hex(32), netns, str(uuid.uuid4()))
    await cni.delete(container_id, netns, pod)

    connector = aiohttp.UnixConnector(path=cni.address.removeprefix("unix:"))
    timeout = aiohttp.ClientTimeout(total=COMMAND_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        pages = {}
        for page in ("healthz", "readyz", "metrics"):
            async with session.get(f"http://capsa/{page}") as response:
                pages[page] = (response.status, response.content_type, await response.text())

    assert pages["healthz"][0] == pages["readyz"][0] == 200
    status, content_type, metrics = pages["metrics"]
    assert (status, content_type) == (200, "text/plain")
    assert 'capsa_cni_requests_total{command="ADD"} 2' in metrics
    assert 'capsa_cni_requests_total{command="DEL"} 1' in metrics
    assert 'capsa_cni_errors_total{command="ADD",code="3"} 1' in metrics
    assert 'capsa_cni_request_duration_seconds_count{command="ADD"} 2' in metrics
    assert 'capsa_cni_request_duration_seconds_bucket{command="DEL",le="+Inf"} 1' in metrics
    assert "# TYPE capsa_cni_request_duration_seconds histogram" in metrics


# ==== 10. A daemon killed in the middle of an ADD; leftovers of killed ADDs ====


@dataclass
class DaemonProcess:
    """capsa-cni-daemon in a process of its own (this file run as a script)."""

    socket: Path
    ports: Path
    bridge_linger: float = 0.0
    process: subprocess.Popen[bytes] | None = None

    def start(self, pause_at: str = "", marker: Path | None = None) -> None:
        args = [
            sys.executable,
            __file__,
            str(self.socket),
            str(self.ports),
            str(self.bridge_linger),
        ]
        if pause_at:
            args += [pause_at, str(marker)]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.strip() == b"ready", line

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=COMMAND_TIMEOUT)


async def wait_for(path: Path, timeout: float = COMMAND_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout}s"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("step", "retry"),
    [
        # Before any kernel work: a slow port lookup.
        ("find_ports", "same sandbox"),
        # The veth exists and is on the bridge; the pod end has no address or route yet.
        ("configure_pod_end", "same sandbox"),
        # Plugged and answered; the binding, recorded after the answer, is not.
        ("ports_bound", "none"),
        # containerd's way: DEL of the failed sandbox, then a new sandbox.
        ("configure_pod_end", "new sandbox"),
    ],
)
async def test_daemon_killed_in_the_middle_of_an_add_recovers_on_restart(
    network: Network, work_dir: Path, make_netns: Callable[[], str], step: str, retry: str
) -> None:
    daemon = DaemonProcess(work_dir / "killed.sock", network.ports.path)
    cni = install(work_dir / "cni", f"unix:{daemon.socket}")
    try:
        pod, port = network.add_pod()
        netns = make_netns()
        container_id = secrets.token_hex(32)
        marker = work_dir / "paused"
        daemon.start(pause_at=step, marker=marker)
        add = asyncio.create_task(cni.run("ADD", container_id, netns_path(netns), pod))
        await wait_for(marker)

        daemon.kill()
        outcome = await add

        if retry == "none":
            assert outcome.status == 0, outcome.output
            result = outcome.output
            assert network.ports.bound == {}
            # The daemon records the binding from the veth's tag as it starts, before any call.
            daemon.start()
            assert network.ports.bound == {port.port_id: container_id}
        else:
            assert outcome.error["code"] == 11
            if step != "find_ports":
                # The half-done ADD left a veth of the deterministic name.
                assert link_exists(host_ifname(container_id, "eth0"))
            daemon.start()
            if retry == "new sandbox":
                await cni.delete(container_id, "", pod)
                assert await unplugged(container_id)
                netns, container_id = make_netns(), secrets.token_hex(32)
            result = await cni.add(container_id, netns_path(netns), pod)

        assert result["ips"][0]["address"] == str(port.ip)
        assert pod_state(netns) == {
            "mac": port.mac,
            "mtu": network.mtu,
            "up": True,
            "lo_up": False,
            "addresses": [str(port.ip)],
            "default_via": [(str(network.gateway), "eth0")],
        }
        assert bridge_addresses(network.bridge) == [f"{network.gateway}/24"]
        assert ports_of(network.bridge) == [host_ifname(container_id, "eth0")]
        expected = {port.port_id: container_id}
        assert await network.ports.bound_soon(expected) == expected
        assert await reachable(port.ip.ip)
        await cni.delete(container_id, netns_path(netns), pod, prevResult=result)
        assert await unplugged(container_id)
        assert await gone_soon(network.bridge)
        assert network.ports.bound == {}
    finally:
        daemon.kill()
        cni.remove_veths()


async def test_a_daemon_killed_while_a_bridge_lingers_removes_it_when_it_starts_again(
    network: Network, second_network: Network, work_dir: Path, make_netns: Callable[[], str]
) -> None:
    daemon = DaemonProcess(work_dir / "lingering.sock", network.ports.path, bridge_linger=600)
    cni = install(work_dir / "cni", f"unix:{daemon.socket}")
    # Another daemon's unused bridge, marked as capsa marks them: not this daemon's to remove.
    others = f"capsat{secrets.token_hex(4)}"
    try:
        daemon.start()
        staying, _ = network.add_pod()
        leaving, _ = second_network.add_pod()
        staying_id, leaving_id = secrets.token_hex(32), secrets.token_hex(32)
        staying_netns, leaving_netns = make_netns(), make_netns()
        await cni.add(staying_id, netns_path(staying_netns), staying)
        await cni.add(leaving_id, netns_path(leaving_netns), leaving)
        await cni.delete(leaving_id, netns_path(leaving_netns), leaving)
        assert await unplugged(leaving_id)
        sh("ip", "link", "add", others, "type", "bridge")
        sh("ip", "link", "set", others, "alias", f"capsa-bridge {bridge_keeper('unix:/else')}")

        daemon.kill()
        # Killed within the linger: the bridge no pod uses is left behind.
        assert link_exists(second_network.bridge)
        daemon.bridge_linger = 0.5
        daemon.start()

        assert await gone_soon(second_network.bridge)
        assert ports_of(network.bridge) == [host_ifname(staying_id, "eth0")]
        assert link_exists(others)
    finally:
        daemon.kill()
        cni.remove_veths()
        sh("ip", "link", "del", others, check=False)


LEFTOVERS = {
    # A veth of the attachment's name whose peer never reached the pod's netns.
    "veth with the peer on the host": (
        "link", "add", "{veth}", "type", "veth", "peer", "name", "{peer}",
    ),
    # A veth of the attachment's name whose pod end is there but unconfigured.
    "veth with an unconfigured pod end": (
        "link", "add", "{veth}", "type", "veth", "peer", "eth0", "netns", "{netns}",
    ),
    # The network's bridge, down and without its gateway address.
    "bridge without address": ("link", "add", "{bridge}", "type", "bridge"),
}  # fmt: skip


@pytest.mark.parametrize("leftover", LEFTOVERS.values(), ids=LEFTOVERS.keys())
async def test_add_completes_over_the_leftovers_of_a_killed_add(
    cni: Cni,
    network: Network,
    make_netns: Callable[[], str],
    leftover: tuple[str, ...],
) -> None:
    pod, port = network.add_pod()
    netns = make_netns()
    container_id = secrets.token_hex(32)
    peer = f"capsat{secrets.token_hex(4)}"
    names = {
        "veth": host_ifname(container_id, "eth0"),
        "peer": peer,
        "netns": netns,
        "bridge": network.bridge,
    }
    cni.container_ids.append(container_id)
    sh("ip", *(word.format(**names) for word in leftover))

    result = await cni.add(container_id, netns_path(netns), pod)

    assert result["ips"][0]["address"] == str(port.ip)
    assert pod_state(netns)["addresses"] == [str(port.ip)]
    assert pod_state(netns)["default_via"] == [(str(network.gateway), "eth0")]
    assert bridge_addresses(network.bridge) == [f"{network.gateway}/24"]
    assert not link_exists(peer)
    assert await reachable(port.ip.ip)


TAMPERINGS = {
    # What an operator (or another program) may do to a bridge that capsa made and knows.
    "bridge down without its address": (
        ("link", "set", "{bridge}", "down"),
        ("addr", "flush", "dev", "{bridge}"),
    ),
    "bridge deleted": (("link", "del", "{bridge}"),),
    "bridge deleted and made again": (
        ("link", "del", "{bridge}"),
        ("link", "add", "{bridge}", "type", "bridge"),
    ),
    # A veth of the next attachment's name whose peer never reached the pod's netns.
    "leftover veth of the attachment": (
        ("link", "add", "{veth}", "type", "veth", "peer", "name", "{peer}"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("tampering", TAMPERINGS.values(), ids=TAMPERINGS.keys())
async def test_an_add_on_a_bridge_the_daemon_made_repairs_it_or_makes_it_again(
    cni: Cni,
    network: Network,
    make_netns: Callable[[], str],
    tampering: tuple[tuple[str, ...], ...],
) -> None:
    # The first ADD makes the bridge, which the daemon then plugs later pods on in one go.
    first, _ = network.add_pod()
    first_id = secrets.token_hex(32)
    cni.container_ids.append(first_id)
    await cni.add(first_id, netns_path(make_netns()), first)
    pod, port = network.add_pod()
    netns = make_netns()
    container_id = secrets.token_hex(32)
    peer = f"capsat{secrets.token_hex(4)}"
    names = {"bridge": network.bridge, "veth": host_ifname(container_id, "eth0"), "peer": peer}
    cni.container_ids.append(container_id)
    for command in tampering:
        sh("ip", *(word.format(**names) for word in command))

    result = await cni.add(container_id, netns_path(netns), pod)

    assert result["ips"][0]["address"] == str(port.ip)
    assert pod_state(netns)["addresses"] == [str(port.ip)]
    assert pod_state(netns)["default_via"] == [(str(network.gateway), "eth0")]
    (bridge_link,) = ip_json("link", "show", "dev", network.bridge)
    assert "UP" in bridge_link["flags"]
    assert bridge_addresses(network.bridge) == [f"{network.gateway}/24"]
    assert host_ifname(container_id, "eth0") in ports_of(network.bridge)
    assert not link_exists(peer)
    assert await reachable(port.ip.ip)


# ==== 11. 20 pods started at once through containerd ====


def remove_sandbox_leftovers(network_name: str, macs: set[str]) -> None:
    """What containerd leaves outside its state dir when a sandbox's teardown fails: the netns
    (found by the pods' MACs, which are this test's own) and libcni's result cache."""
    for netns in ip_json("netns", "list"):
        name = netns["name"]
        if name.startswith("cni-") and any(
            link.get("address") in macs for link in ip_json("-n", name, "link", "show")
        ):
            sh("ip", "netns", "del", name, check=False)
    for cached in Path("/var/lib/cni/results").glob(f"{network_name}-*"):
        cached.unlink(missing_ok=True)


async def test_twenty_pods_started_at_once_through_containerd_all_get_networking(
    network: Network, private_runtime_config: Config, work_dir: Path
) -> None:
    pods = [network.add_pod() for _ in range(20)]
    cfg = private_runtime_config
    daemon = CniDaemon(network.ports, f"unix:{work_dir / 'containerd-cni.sock'}")
    await daemon.start()
    cni_config = CniConfig(
        network_name=f"capsa-ct-{secrets.token_hex(4)}", daemon_listen=daemon.address
    )
    try:
        install_cni(dataclasses.replace(cfg, cni=cni_config))
        runtime = HostRuntime(cfg)
        await runtime.ensure_running()
        async with CriClient(runtime.cri_endpoint, timeout=120) as cri:
            try:
                specs = [
                    cri_types.SandboxSpec(
                        name=pod,
                        namespace="capsa-ct",
                        uid=str(uuid.uuid4()),
                        hostname=f"pod-{number}",
                        cgroup_parent=cfg.agent.cgroup_parent,
                    )
                    for number, (pod, _) in enumerate(pods)
                ]
                sandboxes = await asyncio.gather(*(cri.run_pod_sandbox(s) for s in specs))
                statuses = await asyncio.gather(*(cri.pod_sandbox_status(s) for s in sandboxes))

                # containerd took each pod's IP from capsa-cni's result.
                assert [s.ip for s in statuses] == [str(port.ip.ip) for _, port in pods]
                expected = {
                    port.port_id: sandbox
                    for (_, port), sandbox in zip(pods, sandboxes, strict=True)
                }
                assert await network.ports.bound_soon(expected) == expected
                assert sorted(ports_of(network.bridge)) == sorted(
                    host_ifname(s, "eth0") for s in sandboxes
                )
                reached = await asyncio.gather(*(reachable(port.ip.ip) for _, port in pods))
                assert all(reached), reached
                # Their lo is containerd's, by the loopback plugin it runs beside capsa-cni.
                assert all(sandbox_lo_up(host_ifname(s, "eth0")) for s in sandboxes)

                await asyncio.gather(*(cri.stop_pod_sandbox(s) for s in sandboxes))
                await asyncio.gather(*(cri.remove_pod_sandbox(s) for s in sandboxes))

                assert network.ports.bound == {}
                assert await gone_soon(network.bridge)
            finally:
                # Removed while the daemon still answers the DEL that StopPodSandbox makes.
                for sandbox in await cri.list_pod_sandboxes():
                    await cri.stop_pod_sandbox(sandbox.id)
                    await cri.remove_pod_sandbox(sandbox.id)
    finally:
        await daemon.stop()
        remove_sandbox_leftovers(cni_config.network_name, {port.mac for _, port in pods})


# ==== 12. The data plane on its own ====


async def test_failed_plug_leaves_nothing_behind(
    network: Network, make_netns: Callable[[], str]
) -> None:
    _, port = network.add_pod()
    # A gateway outside the pod's subnet: the default route cannot be added.
    unroutable = dataclasses.replace(port, gateway=IPv4Address("192.0.2.1"))
    netns = make_netns()
    container_id = secrets.token_hex(32)

    with (
        contextlib.closing(Dataplane()) as dataplane,
        pytest.raises(DataplaneError, match="cannot configure eth0"),
    ):
        await asyncio.to_thread(
            dataplane.plug,
            container_id,
            netns_path(netns),
            [("eth0", unroutable)],
            "owner",
            "keeper",
        )

    assert not link_exists(host_ifname(container_id, "eth0"))
    assert not link_exists("eth0", netns)


async def test_a_detached_pod_reaches_nothing_and_nothing_reaches_it_before_its_veth_goes(
    network: Network, make_netns: Callable[[], str]
) -> None:
    (_, port), (_, neighbour) = network.add_pod(), network.add_pod()
    netns, other_netns = make_netns(), make_netns()
    container_id, other_id = secrets.token_hex(32), secrets.token_hex(32)
    with contextlib.closing(Dataplane()) as dataplane:
        for cid, where, p in ((container_id, netns, port), (other_id, other_netns, neighbour)):
            await asyncio.to_thread(
                dataplane.plug, cid, netns_path(where), [("eth0", p)], "owner", "keeper"
            )
        assert await reachable(port.ip.ip)
        ping_neighbour = ("busybox", "ping", "-c1", "-W1", str(neighbour.ip.ip))
        assert sh("ip", "netns", "exec", netns, *ping_neighbour, check=False).returncode == 0

        await asyncio.to_thread(dataplane.detach, container_id, "eth0")

        # Still there, on its bridge and up (taking it off or down would wait for a grace
        # period), but locked: neither the host nor its neighbour reaches it, it reaches neither.
        host_end = host_ifname(container_id, "eth0")
        (link,) = ip_json("link", "show", "dev", host_end)
        assert link["master"] == network.bridge and "UP" in link["flags"]
        assert off_the_network(host_end)
        assert not await reachable(port.ip.ip)
        assert sh("ip", "netns", "exec", netns, *ping_neighbour, check=False).returncode != 0
        ping_gateway = ("busybox", "ping", "-c1", "-W1", str(port.gateway))
        assert sh("ip", "netns", "exec", netns, *ping_gateway, check=False).returncode != 0
        neighbour_pings = ("ip", "netns", "exec", other_netns, "busybox", "ping", "-c1", "-W1")
        assert sh(*neighbour_pings, str(port.ip.ip), check=False).returncode != 0
        assert await reachable(neighbour.ip.ip)
        assert await asyncio.to_thread(dataplane.remove_detached, [host_end]) == [host_end]
        await asyncio.to_thread(dataplane.unplug, other_id, "eth0")
    assert not link_exists(host_end)


async def test_a_detached_veth_plugged_again_is_back_on_the_network_and_kept(
    network: Network, make_netns: Callable[[], str]
) -> None:
    # What an ADD of the same attachment finds when the DEL's deletion of its veth never came
    # (the daemon killed right after the DEL's answer).
    _, port = network.add_pod()
    netns = make_netns()
    container_id = secrets.token_hex(32)
    interfaces = [("eth0", port)]
    host_end = host_ifname(container_id, "eth0")
    with contextlib.closing(Dataplane()) as dataplane:
        plug = functools.partial(
            dataplane.plug, container_id, netns_path(netns), interfaces, "owner", "keeper"
        )
        await asyncio.to_thread(plug)
        await asyncio.to_thread(dataplane.detach, container_id, "eth0")
        with pytest.raises(DataplaneError, match="locked on its bridge"):
            await asyncio.to_thread(dataplane.check, container_id, netns_path(netns), interfaces)

        await asyncio.to_thread(plug)

        assert not off_the_network(host_end)
        assert await reachable(port.ip.ip)
        await asyncio.to_thread(dataplane.check, container_id, netns_path(netns), interfaces)
        assert await asyncio.to_thread(dataplane.remove_detached, [host_end]) == []
        await asyncio.to_thread(dataplane.unplug, container_id, "eth0")
    assert not link_exists(host_end)


def test_bridge_creation_races_all_succeed(network: Network) -> None:
    # Separate Dataplane objects share no lock, as two processes would not.
    gateway = IPv4Interface(f"{network.gateway}/24")
    barrier = threading.Barrier(6)
    outcomes: list[object] = []

    def ensure() -> None:
        barrier.wait()
        try:
            with contextlib.closing(Dataplane()) as dataplane:
                outcomes.append(
                    dataplane.ensure_bridge(network.bridge, gateway, 1400, keeper="racers")
                )
        except Exception as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=ensure) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=COMMAND_TIMEOUT)

    assert len(outcomes) == 6
    assert all(not isinstance(o, Exception) for o in outcomes), outcomes
    assert len({o.mac for o in outcomes}) == 1  # type: ignore[attr-defined]
    assert bridge_addresses(network.bridge) == [str(gateway)]
    with contextlib.closing(Dataplane()) as dataplane:
        assert dataplane.remove_bridge_if_unused(network.bridge)
    assert not link_exists(network.bridge)


# ==== 13. A capsule on two networks ====


def test_a_bridge_with_its_overlay_device_alone_is_idle_and_one_with_a_pod_is_not() -> None:
    keeper = f"k-{secrets.token_hex(4)}"
    bridge = f"cbr-t{secrets.token_hex(3)}"
    gateway = IPv4Interface(f"{free_subnet().network_address + 1}/24")
    try:
        with contextlib.closing(Dataplane()) as dataplane:
            dataplane.ensure_bridge(bridge, gateway, 1400, keeper=keeper)
            sh("ip", "link", "add", overlay_name(bridge), "type", "vxlan", "id", "4242",
               "dstport", "4789", "local", "127.0.0.1")  # fmt: skip
            sh("ip", "link", "set", overlay_name(bridge), "master", bridge)
            assert dataplane.idle_bridges(keeper) == [bridge]
            assert dataplane.idle_bridges("another keeper") == []
            sh("ip", "link", "add", f"{bridge}p", "type", "veth", "peer", f"{bridge}q")
            sh("ip", "link", "set", f"{bridge}p", "master", bridge)
            assert dataplane.idle_bridges(keeper) == []
    finally:
        for name in (f"{bridge}p", overlay_name(bridge), bridge):
            sh("ip", "link", "del", name, check=False)


def pod_on_two_networks(first: Network, second: Network) -> tuple[str, PortBinding, PortBinding]:
    pod = str(uuid.uuid4())
    ports = first.new_port(), second.new_port()
    first.ports.add(pod, *ports)
    return pod, *ports


def pod_routes(netns: str) -> list[tuple[str, str | None, str]]:
    return [
        (r["dst"], r.get("gateway"), r["dev"]) for r in ip_json("-n", netns, "-4", "route", "show")
    ]


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
async def test_one_add_plugs_every_network_of_the_capsule_and_check_sees_them_all(
    cni: Cni,
    network: Network,
    second_network: Network,
    make_netns: Callable[[], str],
    version: str,
) -> None:
    pod, first, second = pod_on_two_networks(network, second_network)
    netns = make_netns()
    container_id = secrets.token_hex(32)

    result = await cni.add(container_id, netns_path(netns), pod, cniVersion=version)

    names = [i["name"] for i in result["interfaces"]]
    assert names == [
        network.bridge,
        host_ifname(container_id, "eth0"),
        "eth0",
        second_network.bridge,
        host_ifname(container_id, "eth1"),
        "eth1",
    ]
    assert [(names[ip["interface"]], ip["address"]) for ip in result["ips"]] == [
        ("eth0", str(first.ip)),
        ("eth1", str(second.ip)),
    ]
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": str(network.gateway)}]
    # The first network has the default route, the second only its subnet.
    assert sorted(pod_routes(netns)) == sorted(
        [
            ("default", str(network.gateway), "eth0"),
            (str(network.subnet), None, "eth0"),
            (str(second_network.subnet), None, "eth1"),
        ]
    )
    second_end = pod_state(netns, "eth1")
    assert (second_end["mac"], second_end["mtu"], second_end["addresses"]) == (
        second.mac,
        second_network.mtu,
        [str(second.ip)],
    )
    assert ports_of(second_network.bridge) == [host_ifname(container_id, "eth1")]
    expected = {first.port_id: container_id, second.port_id: container_id}
    assert await network.ports.bound_soon(expected) == expected
    assert await reachable(first.ip.ip) and await reachable(second.ip.ip)
    if version != "0.3.1":
        assert await cni.check(container_id, netns_path(netns), pod, result) == Outcome(0, None)
        sh("ip", "-n", netns, "addr", "flush", "dev", "eth1")
        outcome = await cni.check(container_id, netns_path(netns), pod, result)
        assert "eth1 lacks" in outcome.error["msg"]


@pytest.mark.parametrize("bridges_made_before", [False, True])
async def test_add_fails_when_a_second_interface_name_is_taken_and_leaves_nothing(
    cni: Cni,
    network: Network,
    second_network: Network,
    make_netns: Callable[[], str],
    bridges_made_before: bool,
) -> None:
    if bridges_made_before:
        # The daemon then makes the first interface at once, before it finds eth1 taken.
        earlier, _, _ = pod_on_two_networks(network, second_network)
        earlier_id = secrets.token_hex(32)
        cni.container_ids.append(earlier_id)
        await cni.add(earlier_id, netns_path(make_netns()), earlier)
    pod, _, _ = pod_on_two_networks(network, second_network)
    netns = make_netns()
    sh("ip", "-n", netns, "link", "add", "eth1", "type", "bridge")
    container_id = secrets.token_hex(32)

    outcome = await cni.run("ADD", container_id, netns_path(netns), pod)

    assert outcome.error["code"] == 4
    assert "eth1 already exists" in outcome.error["msg"]
    assert not link_exists(host_ifname(container_id, "eth0"))
    assert not link_exists("eth0", netns)
    assert container_id not in network.ports.bound.values()


async def test_del_unplugs_every_network_of_the_capsule_and_stays_safe(
    cni: Cni, network: Network, second_network: Network, make_netns: Callable[[], str]
) -> None:
    pod, _, _ = pod_on_two_networks(network, second_network)
    netns = make_netns()
    container_id = secrets.token_hex(32)
    await cni.add(container_id, netns_path(netns), pod)

    await cni.delete(container_id, netns_path(netns), pod)

    for name in ("eth0", "eth1"):
        assert off_the_network(host_ifname(container_id, name))
    assert network.ports.bound == {}
    assert await gone_soon(network.bridge) and await gone_soon(second_network.bridge)
    # Again, without K8S_POD_NAME, and once the netns is gone.
    await cni.delete(container_id, netns_path(netns), "")
    sh("ip", "netns", "del", netns)
    await cni.delete(container_id, "", pod)
    for name in ("eth0", "eth1"):
        assert not link_exists(host_ifname(container_id, name))


async def test_a_new_sandbox_takes_every_port_and_a_stale_del_leaves_it(
    cni: Cni, network: Network, second_network: Network, make_netns: Callable[[], str]
) -> None:
    pod, first, second = pod_on_two_networks(network, second_network)
    old_netns, new_netns = make_netns(), make_netns()
    old, new = secrets.token_hex(32), secrets.token_hex(32)
    await cni.add(old, netns_path(old_netns), pod)

    await cni.add(new, netns_path(new_netns), pod)
    await cni.delete(old, netns_path(old_netns), pod)

    assert ports_of(network.bridge) == [host_ifname(new, "eth0")]
    assert ports_of(second_network.bridge) == [host_ifname(new, "eth1")]
    assert not link_exists("eth1", old_netns)
    expected = {first.port_id: new, second.port_id: new}
    assert await network.ports.bound_soon(expected) == expected
    assert await reachable(first.ip.ip) and await reachable(second.ip.ip)


async def test_gc_keeps_or_removes_every_interface_of_an_attachment(
    cni: Cni, network: Network, second_network: Network, make_netns: Callable[[], str]
) -> None:
    kept_pod, kept_first, kept_second = pod_on_two_networks(network, second_network)
    stale_pod, _, _ = pod_on_two_networks(network, second_network)
    kept, stale = secrets.token_hex(32), secrets.token_hex(32)
    await cni.add(kept, netns_path(make_netns()), kept_pod)
    await cni.add(stale, netns_path(make_netns()), stale_pod)

    assert await cni.gc((kept, "eth0")) == Outcome(0, None)

    assert ports_of(network.bridge) == [host_ifname(kept, "eth0")]
    assert ports_of(second_network.bridge) == [host_ifname(kept, "eth1")]
    expected = {kept_first.port_id: kept, kept_second.port_id: kept}
    assert await network.ports.bound_soon(expected) == expected
    assert await reachable(kept_second.ip.ip)


# ---- the daemon of section 10, run as a separate process ----


def _pause_before_configuring_the_pod_end(marker: Path) -> None:
    original = dataplane_module._configure_pod_end

    def paused(*args: Any) -> None:
        marker.write_text("configure_pod_end")
        time.sleep(3600)
        original(*args)

    dataplane_module._configure_pod_end = paused


async def _serve(
    socket_path: Path, ports_file: Path, bridge_linger: float, pause_at: str, marker: Path | None
) -> None:
    """Serves until killed: the test only ever ends this daemon with SIGKILL."""
    if pause_at == "configure_pod_end" and marker is not None:
        _pause_before_configuring_the_pod_end(marker)
    daemon = CniDaemon(
        FilePorts(ports_file, pause_at, marker),
        f"unix:{socket_path}",
        bridge_linger=bridge_linger,
    )
    await daemon.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    socket_arg, ports_arg, linger_arg, *pause = sys.argv[1:]
    asyncio.run(
        _serve(
            Path(socket_arg),
            Path(ports_arg),
            float(linger_arg),
            pause[0] if pause else "",
            Path(pause[1]) if pause else None,
        )
    )
