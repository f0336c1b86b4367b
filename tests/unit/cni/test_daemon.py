from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from capsa.cni.daemon import CniDaemon, create_app, parse_listen
from capsa.network.dataplane import Dataplane, DataplaneError, InterfaceExists, host_ifname
from capsa.network.types import Link, PluggedPort, PortBinding

PORT = PortBinding(
    port_id="port-1",
    network_id="net-1",
    mac="fa:16:3e:00:00:05",
    ip=IPv4Interface("10.217.0.5/16"),
    gateway=IPv4Address("10.217.0.1"),
    bridge="capsa0",
    mtu=1500,
)


class FakePorts:
    def __init__(self) -> None:
        self.ports: dict[str, PortBinding] = {"pod-1": PORT}
        self.bound: dict[str, tuple[str, str]] = {}
        self.calls: list[tuple[str, ...]] = []
        self.fail: Exception | None = None

    async def find_port(self, pod_name: str) -> PortBinding | None:
        if self.fail:
            raise self.fail
        return self.ports.get(pod_name)

    async def port_bound(self, port_id: str, container_id: str, host_ifname: str) -> None:
        self.calls.append(("bound", port_id, container_id, host_ifname))
        self.bound[port_id] = (container_id, host_ifname)

    async def port_unbound(self, port_id: str, container_id: str) -> None:
        self.calls.append(("unbound", port_id, container_id))
        if self.bound.get(port_id, ("",))[0] == container_id:
            del self.bound[port_id]


class FakeDataplane(Dataplane):
    """Records calls instead of touching the kernel; plug takes ``delay`` seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.plugged: dict[tuple[str, str], str] = {}
        self.removed_bridges: list[str] = []
        self.plug_error: Exception | None = None
        self.delay = 0.0
        self.active: dict[str, int] = {}
        self.most_active: dict[str, int] = {}
        self._guard = threading.Lock()

    def plug(self, container_id: str, netns: str, ifname: str, port: PortBinding) -> PluggedPort:
        with self._guard:
            self.active[port.port_id] = self.active.get(port.port_id, 0) + 1
            self.most_active[port.port_id] = max(
                self.most_active.get(port.port_id, 0), self.active[port.port_id]
            )
        try:
            time.sleep(self.delay)
            if self.plug_error:
                raise self.plug_error
            name = host_ifname(container_id, ifname)
            self.plugged[(container_id, ifname)] = port.bridge
            return PluggedPort(
                bridge=Link(port.bridge, "02:00:00:00:00:01"),
                host_end=Link(name, "02:00:00:00:00:02"),
                pod_end=Link(ifname, port.mac),
                netns=netns,
                address=port.ip,
                gateway=port.gateway,
            )
        finally:
            with self._guard:
                self.active[port.port_id] -= 1

    def unplug(self, container_id: str, ifname: str) -> str | None:
        return self.plugged.pop((container_id, ifname), None)

    def remove_bridge_if_unused(self, name: str) -> bool:
        if name in self.plugged.values():
            return False
        self.removed_bridges.append(name)
        return True


@pytest.fixture
def ports() -> FakePorts:
    return FakePorts()


@pytest.fixture
def dataplane() -> FakeDataplane:
    return FakeDataplane()


@pytest.fixture
async def client(ports: FakePorts, dataplane: FakeDataplane) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_app(ports, dataplane))) as test_client:
        yield test_client


def envelope(container_id: str = "c1", pod: str | None = "pod-1", **config: Any) -> dict[str, Any]:
    return {
        "containerId": container_id,
        "netns": f"/var/run/netns/cni-{container_id}",
        "ifname": "eth0",
        "args": f"IgnoreUnknown=1;K8S_POD_NAME={pod}" if pod else "IgnoreUnknown=1",
        "path": "/opt/cni/bin",
        "config": {"cniVersion": "1.0.0", "name": "capsa", "type": "capsa-cni", **config},
    }


async def call(client: TestClient[Any, Any], command: str, body: Any) -> tuple[int, Any]:
    response = await client.post(f"/cni/{command}", json=body)
    text = await response.text()
    return response.status, (await response.json() if text else None)


async def test_add_binds_the_port_and_answers_the_result(
    client: TestClient[Any, Any], ports: FakePorts, dataplane: FakeDataplane
) -> None:
    status, result = await call(client, "add", envelope())
    assert status == 200
    assert result["cniVersion"] == "1.0.0"
    assert result["interfaces"][2] == {
        "name": "eth0",
        "mac": PORT.mac,
        "sandbox": "/var/run/netns/cni-c1",
    }
    assert result["ips"] == [{"address": "10.217.0.5/16", "gateway": "10.217.0.1", "interface": 2}]
    assert dataplane.plugged == {("c1", "eth0"): "capsa0"}
    assert ports.bound == {"port-1": ("c1", host_ifname("c1", "eth0"))}


async def test_add_answers_in_the_config_version(client: TestClient[Any, Any]) -> None:
    body = envelope()
    body["config"]["cniVersion"] = "0.3.1"
    status, result = await call(client, "add", body)
    assert status == 200
    assert result["cniVersion"] == "0.3.1"
    assert result["ips"][0]["version"] == "4"


async def test_add_without_port_says_who_allocates_it(
    client: TestClient[Any, Any], dataplane: FakeDataplane
) -> None:
    status, error = await call(client, "add", envelope(pod="pod-unknown"))
    assert status == 404
    assert error["code"] == 3
    assert "pod-unknown" in error["msg"]
    assert "compute agent" in error["msg"]
    assert dataplane.plugged == {}


async def test_add_without_pod_name_is_code_4(client: TestClient[Any, Any]) -> None:
    status, error = await call(client, "add", envelope(pod=None))
    assert (status, error["code"]) == (400, 4)
    assert "K8S_POD_NAME" in error["msg"]


async def test_add_with_existing_ifname_is_an_error(
    client: TestClient[Any, Any], dataplane: FakeDataplane, ports: FakePorts
) -> None:
    dataplane.plug_error = InterfaceExists("interface eth0 already exists in netns /x")
    status, error = await call(client, "add", envelope())
    assert status == 400
    assert error["code"] == 4
    assert "eth0 already exists" in error["msg"]
    assert ports.bound == {}


async def test_add_kernel_failure_is_internal(
    client: TestClient[Any, Any], dataplane: FakeDataplane
) -> None:
    dataplane.plug_error = DataplaneError("cannot create veth: [Errno 1] Operation not permitted")
    status, error = await call(client, "add", envelope())
    assert (status, error["code"]) == (500, 999)
    assert "Operation not permitted" in error["msg"]


async def test_store_failure_is_try_again_later(
    client: TestClient[Any, Any], ports: FakePorts
) -> None:
    ports.fail = ConnectionError("database is locked")
    status, error = await call(client, "add", envelope())
    assert (status, error["code"]) == (503, 11)
    assert "database is locked" in error["msg"]


async def test_add_unplugs_when_the_result_cannot_be_built(
    client: TestClient[Any, Any], dataplane: FakeDataplane, ports: FakePorts
) -> None:
    body = envelope(prevResult={"interfaces": "not a list"})
    status, error = await call(client, "add", body)
    assert (status, error["code"]) == (400, 7)
    assert dataplane.plugged == {}
    assert ports.bound == {}


async def test_del_unbinds_and_removes_the_unused_bridge(
    client: TestClient[Any, Any], dataplane: FakeDataplane, ports: FakePorts
) -> None:
    await call(client, "add", envelope())
    assert await call(client, "del", envelope()) == (200, None)
    assert dataplane.plugged == {}
    assert ports.bound == {}
    assert dataplane.removed_bridges == ["capsa0"]


@pytest.mark.parametrize(
    "body",
    [
        envelope(),
        {**envelope(), "netns": ""},
        envelope(container_id="never-seen"),
        envelope(pod="pod-without-port"),
        envelope(pod=None),
    ],
)
async def test_del_always_succeeds(client: TestClient[Any, Any], body: dict[str, Any]) -> None:
    assert await call(client, "del", body) == (200, None)
    assert await call(client, "del", body) == (200, None)


async def test_del_of_an_old_sandbox_keeps_the_new_binding(
    client: TestClient[Any, Any], dataplane: FakeDataplane, ports: FakePorts
) -> None:
    await call(client, "add", envelope(container_id="old"))
    await call(client, "del", envelope(container_id="old"))
    await call(client, "add", envelope(container_id="new"))
    assert await call(client, "del", envelope(container_id="old")) == (200, None)
    assert ports.bound == {"port-1": ("new", host_ifname("new", "eth0"))}
    assert ("new", "eth0") in dataplane.plugged


async def test_calls_for_one_capsule_never_overlap(
    client: TestClient[Any, Any], dataplane: FakeDataplane, ports: FakePorts
) -> None:
    dataplane.delay = 0.05
    ports.ports["pod-2"] = PortBinding(**{**PORT.__dict__, "port_id": "port-2"})
    started = time.monotonic()
    results = await asyncio.gather(
        call(client, "add", envelope(container_id="a1")),
        call(client, "add", envelope(container_id="a2")),
        call(client, "add", envelope(container_id="b1", pod="pod-2")),
        call(client, "add", envelope(container_id="b2", pod="pod-2")),
    )
    assert [status for status, _ in results] == [200] * 4
    assert dataplane.most_active == {"port-1": 1, "port-2": 1}
    # The two capsules ran side by side: two rounds of 50 ms, not four.
    assert time.monotonic() - started < 0.18


async def test_bad_json_body_is_code_6(client: TestClient[Any, Any]) -> None:
    response = await client.post("/cni/add", data=b"{not json")
    assert (await response.json())["code"] == 6


async def test_unsupported_version_is_code_1_and_echoes_it(client: TestClient[Any, Any]) -> None:
    body = envelope()
    body["config"]["cniVersion"] = "1.1.0"
    _, error = await call(client, "add", body)
    assert (error["code"], error["cniVersion"]) == (1, "1.1.0")


async def test_check(client: TestClient[Any, Any], dataplane: FakeDataplane) -> None:
    checked: list[tuple[str, str]] = []
    dataplane.check = lambda container_id, netns, ifname, port: checked.append(  # type: ignore[method-assign]
        (container_id, port.port_id)
    )
    assert await call(client, "check", envelope()) == (200, None)
    assert checked == [("c1", "port-1")]


async def test_health(client: TestClient[Any, Any]) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert (await response.json())["status"] == "alive"


@pytest.mark.parametrize("missing", ["", "the daemon lacks CAP_NET_ADMIN: run capsa as root"])
async def test_readiness_says_why_not(
    monkeypatch: pytest.MonkeyPatch, ports: FakePorts, missing: str
) -> None:
    monkeypatch.setattr("capsa.cni.daemon._lacks_net_admin", lambda: missing)
    async with TestClient(TestServer(create_app(ports, FakeDataplane()))) as test_client:
        response = await test_client.get("/readyz")
        body = await response.json()
    if missing:
        assert (response.status, body["reason"]) == (503, missing)
    else:
        assert (response.status, body["status"]) == (200, "ready")


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9519", ("127.0.0.1", 9519)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9519", ("::1", 9519)),
        ("unix:/run/capsa/cni.sock", Path("/run/capsa/cni.sock")),
    ],
)
def test_parse_listen(listen: str, expected: object) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["0.0.0.0:9519", "10.0.0.1:9519", "127.0.0.1", "unix:rel.sock"])
def test_parse_listen_refuses_what_leaves_the_host(listen: str) -> None:
    with pytest.raises(ValueError, match=r"cni\.daemon_listen"):
        parse_listen(listen)


async def test_daemon_on_a_unix_socket(tmp_path: Path, ports: FakePorts) -> None:
    path = tmp_path / "run" / "cni.sock"
    daemon = CniDaemon(ports, f"unix:{path}", dataplane=FakeDataplane())
    await daemon.start()
    try:
        assert daemon.address == f"unix:{path}"
        assert path.stat().st_mode & 0o777 == 0o600
        connector = aiohttp.UnixConnector(path=str(path))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get("http://capsa/healthz") as response,
        ):
            assert response.status == 200
    finally:
        await daemon.stop()
    assert not path.exists()


async def test_daemon_on_a_free_tcp_port(ports: FakePorts) -> None:
    daemon = CniDaemon(ports, "127.0.0.1:0", dataplane=FakeDataplane())
    await daemon.start()
    try:
        host, port = daemon.address.rsplit(":", 1)
        assert host == "127.0.0.1"
        assert int(port) > 0
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{daemon.address}/healthz") as response,
        ):
            assert response.status == 200
    finally:
        await daemon.stop()
