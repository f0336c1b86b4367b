"""capsa-cni end to end on the real kernel: the installed launcher, run as containerd runs it,
talks to the daemon, which plugs veths into real netns on a real bridge.

Every run uses its own bridge name, 10.x.y.0/24 subnet, netns names and daemon port, and removes
them all in teardown, so runs side by side never meet.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import random
import secrets
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from capsa.cni.daemon import CniDaemon
from capsa.cni.install import install_cni
from capsa.config import CniConfig, Config
from capsa.cri import types as cri_types
from capsa.cri.client import CriClient
from capsa.network.dataplane import Dataplane, DataplaneError, host_ifname
from capsa.network.types import PortBinding
from capsa.runtime.host import HostRuntime

pytestmark = pytest.mark.integration

COMMAND_TIMEOUT = 30.0


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


def link_exists(name: str, netns: str | None = None) -> bool:
    where = ("-n", netns) if netns else ()
    return bool(ip_json(*where, "link", "show", "dev", name))


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


class MemoryPorts:
    """A PortSource in memory; port_unbound forgets only its own container's binding."""

    def __init__(self) -> None:
        self.ports: dict[str, PortBinding] = {}
        self.bound: dict[str, str] = {}

    async def find_port(self, pod_name: str) -> PortBinding | None:
        return self.ports.get(pod_name)

    async def port_bound(self, port_id: str, container_id: str, host_ifname: str) -> None:
        self.bound[port_id] = container_id

    async def port_unbound(self, port_id: str, container_id: str) -> None:
        if self.bound.get(port_id) == container_id:
            del self.bound[port_id]


@dataclass
class Network:
    bridge: str
    subnet: IPv4Network
    ports: MemoryPorts = field(default_factory=MemoryPorts)

    @property
    def gateway(self) -> IPv4Address:
        return self.subnet.network_address + 1

    def add_pod(self, number: int) -> tuple[str, PortBinding]:
        pod = f"capsule-{secrets.token_hex(4)}"
        port = PortBinding(
            port_id=f"port-{pod}",
            network_id="net-test",
            mac=f"fa:16:3e:{secrets.token_hex(1)}:{secrets.token_hex(1)}:{number:02x}",
            ip=IPv4Interface(f"{self.subnet.network_address + 10 + number}/24"),
            gateway=self.gateway,
            bridge=self.bridge,
            mtu=1400,
        )
        self.ports.ports[pod] = port
        return pod, port


@pytest.fixture
def network() -> Iterator[Network]:
    net = Network(bridge=f"capsat{secrets.token_hex(4)}", subnet=free_subnet())
    try:
        yield net
    finally:
        sh("ip", "link", "del", net.bridge, check=False)


@pytest.fixture
def make_netns() -> Iterator[Any]:
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


@dataclass
class Cni:
    """Runs the installed launcher exactly as containerd 1.6 does."""

    launcher: Path
    plugin_conf: dict[str, Any]
    container_ids: list[str] = field(default_factory=list)

    async def __call__(
        self,
        command: str,
        container_id: str,
        netns: str,
        pod: str,
        ifname: str = "eth0",
        prev_result: dict[str, Any] | None = None,
    ) -> tuple[int, Any]:
        self.container_ids.append(container_id)
        args = [
            "IgnoreUnknown=1",
            "K8S_POD_NAMESPACE=default",
            f"K8S_POD_NAME={pod}",
            f"K8S_POD_INFRA_CONTAINER_ID={container_id}",
            f"K8S_POD_UID={secrets.token_hex(8)}",
        ]
        random.shuffle(args)
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": ifname,
            "CNI_ARGS": ";".join(args),
            "CNI_PATH": str(self.launcher.parent),
        }
        conf = dict(self.plugin_conf)
        if prev_result is not None:
            conf["prevResult"] = prev_result
        process = await asyncio.create_subprocess_exec(
            str(self.launcher),
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(
            process.communicate(json.dumps(conf).encode()), COMMAND_TIMEOUT
        )
        assert not stderr, stderr
        assert process.returncode is not None
        return process.returncode, json.loads(stdout) if stdout.strip() else None


@pytest.fixture
async def cni(network: Network, tmp_path: Path) -> AsyncIterator[Cni]:
    daemon = CniDaemon(network.ports, "127.0.0.1:0")
    await daemon.start()
    try:
        cfg = Config(state_dir=tmp_path, cni=CniConfig(daemon_listen=daemon.address))
        install_cni(cfg)
        conflist = json.loads((cfg.cni_conf_dir / "10-capsa.conflist").read_text())
        # What libcni hands the first plugin: its conf plus the list's name and version.
        (plugin_conf,) = conflist["plugins"]
        plugin_conf.pop("capabilities")
        plugin_conf.update(name=conflist["name"], cniVersion=conflist["cniVersion"])
        runner = Cni(cfg.cni_bin_dir / "capsa-cni", plugin_conf)
        try:
            yield runner
        finally:
            for container_id in runner.container_ids:
                sh("ip", "link", "del", host_ifname(container_id, "eth0"), check=False)
    finally:
        await daemon.stop()


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


async def reachable(address: IPv4Address) -> bool:
    process = await asyncio.create_subprocess_exec(
        "busybox", "ping", "-c1", "-W1", str(address),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    return await asyncio.wait_for(process.wait(), COMMAND_TIMEOUT) == 0


async def test_add_plugs_the_pod_and_del_removes_everything(
    cni: Cni, network: Network, make_netns: Any
) -> None:
    pod, port = network.add_pod(1)
    netns = make_netns()
    container_id = secrets.token_hex(32)

    status, result = await cni("ADD", container_id, netns_path(netns), pod)

    assert status == 0, result
    assert result["cniVersion"] == "1.0.0"
    bridge, host_end, pod_end = result["interfaces"]
    assert bridge["name"] == network.bridge
    assert host_end["name"] == host_ifname(container_id, "eth0")
    assert pod_end == {"name": "eth0", "mac": port.mac, "sandbox": netns_path(netns)}
    assert result["ips"] == [
        {"address": str(port.ip), "gateway": str(network.gateway), "interface": 2}
    ]
    assert pod_state(netns) == {
        "mac": port.mac,
        "mtu": 1400,
        "up": True,
        "lo_up": True,
        "addresses": [str(port.ip)],
        "default_via": [(str(network.gateway), "eth0")],
    }
    (host_link,) = ip_json("link", "show", "dev", host_end["name"])
    assert host_link["master"] == network.bridge
    assert host_link["mtu"] == 1400
    (bridge_addr,) = ip_json("-4", "addr", "show", "dev", network.bridge)
    assert f"{network.gateway}/24" in [
        f"{a['local']}/{a['prefixlen']}" for a in bridge_addr["addr_info"]
    ]
    (bridge_link,) = ip_json("link", "show", "dev", network.bridge)
    # The bridge keeps its own MAC instead of adopting its port's.
    assert bridge_link["address"] == bridge["mac"] != host_link["address"]
    assert network.ports.bound == {port.port_id: container_id}
    assert await reachable(port.ip.ip)

    assert await cni("DEL", container_id, netns_path(netns), pod, prev_result=result) == (0, None)

    assert not link_exists(host_end["name"])
    assert not link_exists("eth0", netns)
    assert not link_exists(network.bridge)
    assert network.ports.bound == {}
    # DEL again, DEL once the netns is gone, DEL of a container never seen: all succeed.
    assert await cni("DEL", container_id, netns_path(netns), pod) == (0, None)
    assert await cni("DEL", container_id, "", pod) == (0, None)
    assert await cni("DEL", secrets.token_hex(32), "", pod) == (0, None)


async def test_add_into_a_netns_that_has_the_ifname_fails(
    cni: Cni, network: Network, make_netns: Any
) -> None:
    pod, port = network.add_pod(2)
    netns = make_netns()
    first = secrets.token_hex(32)
    assert (await cni("ADD", first, netns_path(netns), pod))[0] == 0

    second = secrets.token_hex(32)
    status, error = await cni("ADD", second, netns_path(netns), pod)

    assert status != 0
    assert error["code"] == 4
    assert "eth0 already exists" in error["msg"]
    assert not link_exists(host_ifname(second, "eth0"))
    assert network.ports.bound == {port.port_id: first}
    assert await reachable(port.ip.ip)


async def test_check_reports_what_differs(cni: Cni, network: Network, make_netns: Any) -> None:
    pod, port = network.add_pod(6)
    netns = make_netns()
    container_id = secrets.token_hex(32)
    status, result = await cni("ADD", container_id, netns_path(netns), pod)
    assert status == 0
    assert await cni("CHECK", container_id, netns_path(netns), pod, prev_result=result) == (0, None)

    sh("ip", "-n", netns, "addr", "del", str(port.ip), "dev", "eth0")
    status, error = await cni("CHECK", container_id, netns_path(netns), pod, prev_result=result)

    assert status != 0
    assert f"eth0 lacks {port.ip}" in error["msg"]


async def test_add_into_a_missing_netns_names_it(cni: Cni, network: Network) -> None:
    pod, _ = network.add_pod(3)
    missing = f"/run/netns/capsa-t-missing-{secrets.token_hex(4)}"
    status, error = await cni("ADD", secrets.token_hex(32), missing, pod)
    assert status != 0
    assert error["code"] == 4
    assert missing in error["msg"]


async def test_del_of_an_old_sandbox_leaves_the_new_one(
    cni: Cni, network: Network, make_netns: Any
) -> None:
    # containerd's retry after a failed sandbox: same capsule, new container id and netns.
    pod, port = network.add_pod(4)
    old_netns, new_netns = make_netns(), make_netns()
    old, new = secrets.token_hex(32), secrets.token_hex(32)
    assert (await cni("ADD", old, netns_path(old_netns), pod))[0] == 0
    assert await cni("DEL", old, netns_path(old_netns), pod) == (0, None)
    assert (await cni("ADD", new, netns_path(new_netns), pod))[0] == 0

    assert await cni("DEL", old, netns_path(old_netns), pod) == (0, None)

    assert link_exists(host_ifname(new, "eth0"))
    assert pod_state(new_netns)["addresses"] == [str(port.ip)]
    assert network.ports.bound == {port.port_id: new}
    assert await reachable(port.ip.ip)


async def test_ten_concurrent_adds(cni: Cni, network: Network, make_netns: Any) -> None:
    pods = [(*network.add_pod(10 + i), make_netns(), secrets.token_hex(32)) for i in range(10)]

    results = await asyncio.gather(
        *(cni("ADD", cid, netns_path(ns), pod) for pod, _, ns, cid in pods)
    )

    assert [status for status, _ in results] == [0] * 10, results
    for (_, port, ns, _), (_, result) in zip(pods, results, strict=True):
        assert pod_state(ns)["addresses"] == [str(port.ip)]
        assert result["ips"][0]["address"] == str(port.ip)
    reached = await asyncio.gather(*(reachable(port.ip.ip) for _, port, _, _ in pods))
    assert all(reached)

    deleted = await asyncio.gather(
        *(cni("DEL", cid, netns_path(ns), pod) for pod, _, ns, cid in pods)
    )
    assert deleted == [(0, None)] * 10
    assert not link_exists(network.bridge)


async def test_failed_plug_leaves_nothing_behind(network: Network, make_netns: Any) -> None:
    _, port = network.add_pod(5)
    # A gateway outside the pod's subnet: the default route cannot be added.
    unroutable = PortBinding(**{**port.__dict__, "gateway": IPv4Address("192.0.2.1")})
    netns = make_netns()
    container_id = secrets.token_hex(32)

    with pytest.raises(DataplaneError, match="cannot configure eth0"):
        await asyncio.to_thread(
            Dataplane().plug, container_id, netns_path(netns), "eth0", unroutable
        )

    assert not link_exists(host_ifname(container_id, "eth0"))
    assert not link_exists("eth0", netns)


def test_bridge_creation_races_all_succeed(network: Network) -> None:
    # Separate Dataplane objects share no lock, as two processes would not.
    gateway = IPv4Interface(f"{network.gateway}/24")
    barrier = threading.Barrier(6)
    outcomes: list[object] = []

    def ensure() -> None:
        barrier.wait()
        try:
            outcomes.append(Dataplane().ensure_bridge(network.bridge, gateway, 1400))
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
    (bridge,) = ip_json("-4", "addr", "show", "dev", network.bridge)
    assert [f"{a['local']}/{a['prefixlen']}" for a in bridge["addr_info"]] == [str(gateway)]
    assert Dataplane().remove_bridge_if_unused(network.bridge)
    assert not link_exists(network.bridge)


def remove_sandbox_leftovers(network_name: str, mac: str) -> None:
    """What containerd leaves outside its state dir when a sandbox's teardown fails: the netns
    (found by the pod's MAC, which is this test's own) and libcni's result cache."""
    for netns in ip_json("netns", "list"):
        name = netns["name"]
        if name.startswith("cni-") and any(
            link.get("address") == mac for link in ip_json("-n", name, "link", "show")
        ):
            sh("ip", "netns", "del", name, check=False)
    for cached in Path("/var/lib/cni/results").glob(f"{network_name}-*"):
        cached.unlink(missing_ok=True)


async def test_containerd_networks_a_sandbox_through_capsa_cni(
    network: Network, private_runtime_config: Config
) -> None:
    pod, port = network.add_pod(7)
    cfg = private_runtime_config
    cni_config = CniConfig(network_name=f"capsa-it-{secrets.token_hex(4)}")
    daemon = CniDaemon(network.ports, "127.0.0.1:0")
    await daemon.start()
    try:
        cni_config = dataclasses.replace(cni_config, daemon_listen=daemon.address)
        install_cni(dataclasses.replace(cfg, cni=cni_config))
        runtime = HostRuntime(cfg)
        await runtime.ensure_running()
        async with CriClient(runtime.cri_endpoint, timeout=cfg.agent.cri_timeout) as cri:
            try:
                spec = cri_types.SandboxSpec(
                    name=pod,
                    namespace="capsa-it",
                    uid=str(uuid.uuid4()),
                    hostname="capsa-it",
                    cgroup_parent=cfg.agent.cgroup_parent,
                )
                sandbox_id = await cri.run_pod_sandbox(spec)
                status = await cri.pod_sandbox_status(sandbox_id)
                # containerd took the pod's IP from capsa-cni's result.
                assert status.ip == str(port.ip.ip)
                assert network.ports.bound == {port.port_id: sandbox_id}
                assert link_exists(host_ifname(sandbox_id, "eth0"))
                assert await reachable(port.ip.ip)

                await cri.stop_pod_sandbox(sandbox_id)
                await cri.remove_pod_sandbox(sandbox_id)

                assert not link_exists(host_ifname(sandbox_id, "eth0"))
                assert network.ports.bound == {}
                assert not link_exists(network.bridge)
            finally:
                # Removed while the daemon still answers the DEL that StopPodSandbox makes.
                for sandbox in await cri.list_pod_sandboxes():
                    await cri.stop_pod_sandbox(sandbox.id)
                    await cri.remove_pod_sandbox(sandbox.id)
    finally:
        await daemon.stop()
        remove_sandbox_leftovers(cni_config.network_name, port.mac)
