"""The CNI daemon through a real CniDaemon on a unix socket, with a fake store and data plane.

The daemon serves each call on a thread of its own (capsa.cni.server): the fakes are called on
those threads, so they block and signal with threading primitives, and every wait a test makes on
them is bounded, so that a bug fails a test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import http.client
import json
import logging
import queue
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from capsa.cni.daemon import CniDaemon, parse_listen
from capsa.cni.protocol import ENVIRONMENT_HEADERS, attachment_owner, bridge_keeper
from capsa.cni.server import HttpRequest, HttpResponse
from capsa.model.capsule import Capsule
from capsa.network.dataplane import (
    Attachment,
    AttachmentTag,
    Dataplane,
    DataplaneError,
    InterfaceExists,
    host_ifname,
    pod_ifnames,
)
from capsa.network.service import NetworkService
from capsa.network.types import Link, PluggedPort, PortBinding, PortSource
from capsa.store import Store, notify

# How long a test waits for something that should happen (it normally takes milliseconds).
WAIT_S = 5.0
# The longest a test's CNI call may take before it fails, rather than hang the suite.
CALL_TIMEOUT_S = 20.0

PORT = PortBinding(
    port_id="port-1",
    network_id="net-1",
    mac="fa:16:3e:00:00:05",
    ip=IPv4Interface("10.217.0.5/16"),
    gateway=IPv4Address("10.217.0.1"),
    bridge="capsa0",
    mtu=1500,
)


SECOND_PORT = PortBinding(
    port_id="port-2",
    network_id="net-2",
    mac="fa:16:3e:00:01:07",
    ip=IPv4Interface("10.218.0.7/24"),
    gateway=IPv4Address("10.218.0.1"),
    bridge="capsa1",
    mtu=1400,
)


class FakePorts:
    """The port store, in memory; called on the daemon's threads, like the real one."""

    def __init__(self) -> None:
        # Each pod's ports in its interface order.
        self.ports: dict[str, list[PortBinding]] = {"pod-1": [PORT]}
        self.bound: dict[str, tuple[str, str]] = {}
        self.fail: Exception | None = None
        # The round trips to the store, by method name.
        self.calls: list[str] = []

    def find_ports(self, pod_name: str) -> list[PortBinding]:
        self.calls.append("find_ports")
        if self.fail:
            raise self.fail
        return [
            dataclasses.replace(
                port,
                bound_container_id=self.bound[port.port_id][0],
                bound_host_ifname=self.bound[port.port_id][1],
            )
            if port.port_id in self.bound
            else port
            for port in self.ports.get(pod_name, [])
        ]

    def bindings_of(self, port_ids: Sequence[str]) -> dict[str, tuple[str, str] | None]:
        self.calls.append("bindings_of")
        known = {port.port_id for ports in self.ports.values() for port in ports}
        return {port_id: self.bound.get(port_id) for port_id in port_ids if port_id in known}

    def ports_bound(self, container_id: str, host_ifnames: dict[str, str]) -> None:
        self.calls.append("ports_bound")
        for port_id, host_name in host_ifnames.items():
            self.bound[port_id] = (container_id, host_name)

    def ports_unbound(self, port_ids: Sequence[str], container_id: str) -> None:
        self.calls.append("ports_unbound")
        self._unbind(port_ids, container_id)

    def pod_unbound(self, pod_name: str, container_id: str) -> list[str]:
        self.calls.append("pod_unbound")
        if self.fail:
            raise self.fail
        unbound = [
            port.port_id
            for port in self.ports.get(pod_name, [])
            if self.bound.get(port.port_id, ("",))[0] == container_id
        ]
        self._unbind(unbound, container_id)
        return unbound

    def _unbind(self, port_ids: Sequence[str], container_id: str) -> None:
        for port_id in port_ids:
            if self.bound.get(port_id, ("",))[0] == container_id:
                del self.bound[port_id]


class FakeDataplane(Dataplane):
    """Keeps attachments in a dict instead of the kernel; plug takes ``delay`` seconds."""

    def __init__(self) -> None:
        super().__init__()
        # By host end name, as the kernel would hold them.
        self.links: dict[str, Attachment] = {}
        self.detached: set[str] = set()
        self.removed_bridges: list[str] = []
        # The bridges there are, by name: their keeper.
        self.bridges: dict[str, str] = {}
        self.plug_error: Exception | None = None
        self.remove_errors: dict[str, Exception] = {}
        self.delay = 0.0
        # When set, every plug waits here for another plug to be under way too.
        self.meeting: threading.Barrier | None = None
        self.active: dict[str, int] = {}
        self.most_active: dict[str, int] = {}
        self.most_active_overall = 0
        self._guard = threading.Lock()

    @property
    def plugged(self) -> dict[tuple[str, str], str]:
        """(container id, port id) -> bridge of every attachment on the network (not detached)."""
        return {
            (a.tag.container_id, a.tag.port_id): a.bridge or ""
            for name, a in self.links.items()
            if a.tag and name not in self.detached
        }

    def plug(
        self,
        container_id: str,
        netns: str,
        interfaces: Sequence[tuple[str, PortBinding]],
        owner: str,
        keeper: str,
    ) -> list[PluggedPort]:
        pod = ",".join(port.port_id for _, port in interfaces)
        with self._guard:
            self.active[pod] = self.active.get(pod, 0) + 1
            self.most_active[pod] = max(self.most_active.get(pod, 0), self.active[pod])
            self.most_active_overall = max(self.most_active_overall, sum(self.active.values()))
        try:
            time.sleep(self.delay)
            if self.meeting is not None:
                self.meeting.wait()
            if self.plug_error:
                raise self.plug_error
            for _, port in interfaces:
                self.bridges[port.bridge] = keeper
            return [self._plug_interface(container_id, netns, *i, owner) for i in interfaces]
        finally:
            with self._guard:
                self.active[pod] -= 1

    def _plug_interface(
        self, container_id: str, netns: str, ifname: str, port: PortBinding, owner: str
    ) -> PluggedPort:
        name = host_ifname(container_id, ifname)
        replaced = None
        replaces = port.bound_host_ifname
        if replaces and replaces != name and self.links.pop(replaces, None):
            replaced = replaces
        tag = AttachmentTag(owner, port.port_id, container_id)
        self.links[name] = Attachment(name, port.bridge, tag)
        self.detached.discard(name)
        return PluggedPort(
            bridge=Link(port.bridge, "02:00:00:00:00:01"),
            host_end=Link(name, "02:00:00:00:00:02"),
            pod_end=Link(ifname, port.mac),
            netns=netns,
            address=port.ip,
            gateway=port.gateway,
            mtu=port.mtu,
            replaced=replaced,
        )

    def unplug(self, container_id: str, ifname: str) -> list[Attachment]:
        removed = [self.remove_attachment(name) for name in self._names(container_id, ifname)]
        return [a for a in removed if a is not None]

    def remove_attachment(self, host_name: str) -> Attachment | None:
        if host_name in self.remove_errors:
            raise self.remove_errors[host_name]
        self.detached.discard(host_name)
        return self.links.pop(host_name, None)

    def detach(self, container_id: str, ifname: str) -> list[Attachment]:
        detached = []
        for name in self._names(container_id, ifname):
            if name in self.remove_errors:
                raise self.remove_errors[name]
            attachment = self.links[name]
            self.links[name] = Attachment(name, None, attachment.tag)
            self.detached.add(name)
            detached.append(attachment)
        return detached

    def remove_detached(self, host_names: Sequence[str]) -> list[str]:
        removed = [name for name in host_names if name in self.detached]
        for name in removed:
            self.detached.discard(name)
            del self.links[name]
        return removed

    def _names(self, container_id: str, ifname: str) -> list[str]:
        """The host ends of the attachment, numbered from ifname up to the first missing."""
        names = []
        for name in (host_ifname(container_id, n) for n in pod_ifnames(ifname)):
            if name not in self.links:
                break
            names.append(name)
        return names

    def attachments(self) -> list[Attachment]:
        return list(self.links.values())

    def idle_bridges(self, keeper: str) -> list[str]:
        used = {a.bridge for a in self.links.values()}
        return [name for name, k in self.bridges.items() if k == keeper and name not in used]

    def remove_bridge_if_unused(self, name: str) -> bool:
        if any(a.bridge == name for a in self.links.values()):
            return False
        self.bridges.pop(name, None)
        self.removed_bridges.append(name)
        return True


@pytest.fixture
def ports() -> FakePorts:
    return FakePorts()


@pytest.fixture
def dataplane() -> FakeDataplane:
    return FakeDataplane()


@contextmanager
def short_directory() -> Iterator[Path]:
    """A new directory under /tmp, removed afterwards: a unix socket's path has at most 107
    bytes, which pytest's tmp_path may pass."""
    directory = Path(tempfile.mkdtemp(prefix="capsa-cni-t-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class AfterAnswerWork:
    """Counts the work the daemon's calls left for after their answers (HttpResponse.after: an
    ADD's record of its bindings, a DEL's veth deletion and bridge retirement), so that a test
    can wait until it is all done, or until the ADDs' is.

    A call's work is counted before its answer is sent, so a test that got the answer never
    misses it.
    """

    def __init__(self) -> None:
        self._pending = 0
        self._pending_adds = 0
        self._changed = threading.Condition()

    def tracking(
        self, handler: Callable[[HttpRequest], HttpResponse]
    ) -> Callable[[HttpRequest], HttpResponse]:
        def tracked(request: HttpRequest) -> HttpResponse:
            response = handler(request)
            if response.after is None:
                return response
            add = request.path == "/cni/add"
            with self._changed:
                self._pending += 1
                self._pending_adds += add
            return dataclasses.replace(
                response, after=functools.partial(self._run, response.after, add)
            )

        return tracked

    def _run(self, after: Callable[[], None], add: bool) -> None:
        try:
            after()
        finally:
            with self._changed:
                self._pending -= 1
                self._pending_adds -= add
                self._changed.notify_all()

    def wait_done(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._pending == 0, timeout)

    def wait_adds_done(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._pending_adds == 0, timeout)


# Each served session's AfterAnswerWork, by id(session), for call().
_AFTER_ANSWERS: dict[int, AfterAnswerWork] = {}


@dataclasses.dataclass
class Served:
    """A running daemon and a client of it."""

    daemon: CniDaemon
    # Reaches the daemon as capsa-cni does, on its unix socket.
    session: aiohttp.ClientSession
    after_answers: AfterAnswerWork

    @property
    def socket_path(self) -> Path:
        path = parse_listen(self.daemon.address)
        assert isinstance(path, Path)
        return path


@asynccontextmanager
async def serving(
    ports: PortSource, dataplane: Dataplane, *, listen: str | None = None, **daemon_kwargs: Any
) -> AsyncIterator[Served]:
    """A CniDaemon on a unix socket (``listen``, or one in a new short directory) and a client
    session to it; stops both on the way out."""
    with short_directory() as directory:
        listen = listen or f"unix:{directory / 'cni.sock'}"
        socket_path = parse_listen(listen)
        assert isinstance(socket_path, Path)
        # A DEL's veths are deleted once its answer is out, not a second later, unless a test
        # says otherwise: the tests wait for the work after answers, not for timers.
        daemon_kwargs.setdefault("detached_veth_wait", 0.0)
        daemon = CniDaemon(ports, listen, dataplane=dataplane, **daemon_kwargs)
        after_answers = AfterAnswerWork()
        # Wraps the handler its server calls for every request: the daemon has no public way
        # to say when its work after an answer is over, and the tests need to wait for it.
        daemon._server._handler = after_answers.tracking(daemon._server._handler)
        await daemon.start()
        try:
            async with aiohttp.ClientSession(
                base_url="http://capsa-cni-daemon",
                connector=aiohttp.UnixConnector(path=str(socket_path)),
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S),
            ) as session:
                _AFTER_ANSWERS[id(session)] = after_answers
                try:
                    yield Served(daemon, session, after_answers)
                finally:
                    del _AFTER_ANSWERS[id(session)]
        finally:
            await daemon.stop()


@pytest.fixture
async def served(ports: FakePorts, dataplane: FakeDataplane) -> AsyncIterator[Served]:
    async with serving(ports, dataplane) as daemon_and_session:
        yield daemon_and_session


@pytest.fixture
def client(served: Served) -> aiohttp.ClientSession:
    return served.session


async def after_answers_done(served: Served) -> None:
    """Waits for the work the daemon does after its answers: a DEL's veth deletion, and the
    retirement of the bridges no pod is left on."""
    assert await asyncio.to_thread(served.after_answers.wait_done, WAIT_S), (
        "the daemon's work after its answers did not end"
    )


def envelope(container_id: str = "c1", pod: str | None = "pod-1", **config: Any) -> dict[str, Any]:
    return {
        "containerId": container_id,
        "netns": f"/var/run/netns/cni-{container_id}",
        "ifname": "eth0",
        "args": f"IgnoreUnknown=1;K8S_POD_NAME={pod}" if pod else "IgnoreUnknown=1",
        "path": "/opt/cni/bin",
        "config": {
            "cniVersion": "1.0.0",
            "name": "capsa",
            "type": "capsa-cni",
            **config,
        },
    }


def network_envelope(**config: Any) -> dict[str, Any]:
    """A GC or STATUS call: CNI 1.1.0, no attachment."""
    return {
        "containerId": "",
        "netns": "",
        "ifname": "",
        "args": "",
        "path": "/opt/cni/bin",
        "config": {
            "cniVersion": "1.1.0",
            "name": "capsa",
            "type": "capsa-cni",
            **config,
        },
    }


def gc_envelope(*valid: tuple[str, str]) -> dict[str, Any]:
    attachments = [{"containerID": cid, "ifname": ifname} for cid, ifname in valid]
    return network_envelope(**{"cni.dev/valid-attachments": attachments})


# Where each variable goes in an envelope (the call as the tests write it).
_ENVELOPE_KEYS = {
    "containerId": "CNI_CONTAINERID",
    "netns": "CNI_NETNS",
    "ifname": "CNI_IFNAME",
    "args": "CNI_ARGS",
    "path": "CNI_PATH",
}


def cni_headers(envelope: dict[str, Any]) -> dict[str, str]:
    """``envelope``'s variables as capsa-cni sends them: percent-encoded headers."""
    return {
        ENVIRONMENT_HEADERS[variable]: quote(envelope[key], safe="", errors="surrogateescape")
        for key, variable in _ENVELOPE_KEYS.items()
        if envelope.get(key)
    }


async def call(
    client: aiohttp.ClientSession,
    command: str,
    envelope: dict[str, Any],
    *,
    until_recorded: bool = True,
) -> tuple[int, Any]:
    """``envelope``'s call as capsa-cni makes it: its variables as headers, its config as the
    body. An ADD's call returns once the daemon has recorded the bindings too, which it does
    after its answer (unless ``until_recorded`` is false)."""
    body = json.dumps(envelope["config"]).encode()
    async with client.post(f"/cni/{command}", data=body, headers=cni_headers(envelope)) as response:
        text = await response.text()
    after_answers = _AFTER_ANSWERS.get(id(client))
    if command == "add" and until_recorded and after_answers is not None:
        recorded = await asyncio.to_thread(after_answers.wait_adds_done, WAIT_S)
        assert recorded, "the daemon did not record an ADD's bindings"
    return response.status, (json.loads(text) if text else None)


async def page(client: aiohttp.ClientSession, path: str) -> str:
    """The body of a GET of ``path``, which must succeed."""
    async with client.get(path) as response:
        assert response.status == 200
        return await response.text()


async def added(client: aiohttp.ClientSession, body: dict[str, Any]) -> dict[str, Any]:
    status, result = await call(client, "add", body)
    assert status == 200, result
    return dict(result)


# ---- ADD ----


async def test_add_binds_the_port_and_answers_the_result(
    client: aiohttp.ClientSession, ports: FakePorts, dataplane: FakeDataplane
) -> None:
    result = await added(client, envelope())
    assert result["cniVersion"] == "1.0.0"
    assert result["interfaces"][2] == {
        "name": "eth0",
        "mac": PORT.mac,
        "sandbox": "/var/run/netns/cni-c1",
    }
    assert result["ips"] == [{"address": "10.217.0.5/16", "gateway": "10.217.0.1", "interface": 2}]
    assert dataplane.plugged == {("c1", "port-1"): "capsa0"}
    assert ports.bound == {"port-1": ("c1", host_ifname("c1", "eth0"))}


class WakingPorts(FakePorts):
    """Wakes the event loop from its writes, as the store's blocking writes do."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.woken: list[str] = []
        self.fail_after_waking: Exception | None = None

    def ports_bound(self, container_id: str, host_ifnames: dict[str, str]) -> None:
        notify.call_soon_on(self.loop, self.woken.append, f"bound {container_id}")
        if self.fail_after_waking is not None:
            raise self.fail_after_waking
        super().ports_bound(container_id, host_ifnames)

    def pod_unbound(self, pod_name: str, container_id: str) -> list[str]:
        notify.call_soon_on(self.loop, self.woken.append, f"unbound {container_id}")
        if self.fail_after_waking is not None:
            raise self.fail_after_waking
        return super().pod_unbound(pod_name, container_id)


async def test_the_wakeups_of_a_calls_writes_reach_the_loop_after_its_answer(
    dataplane: FakeDataplane,
) -> None:
    ports = WakingPorts(asyncio.get_running_loop())
    async with serving(ports, dataplane) as served:
        await added(served.session, envelope("c1"))
        assert (await call(served.session, "del", envelope("c1")))[0] == 200
        await added(served.session, envelope("c2"))
        # A call that fails after its write woke the loop: the wake-up is not lost either.
        ports.fail_after_waking = RuntimeError("the disk is full")
        status, error = await call(served.session, "del", envelope("c2"))
        assert status == 503 and "the disk is full" in error["msg"]
        await after_answers_done(served)
    for _ in range(5):
        await asyncio.sleep(0)
    assert ports.woken == ["bound c1", "unbound c1", "bound c2", "unbound c2"]


async def test_variables_come_back_from_their_percent_encoded_headers(
    client: aiohttp.ClientSession,
) -> None:
    # Any bytes a runtime may set: spaces, non-ASCII, a literal percent sign, non-UTF-8.
    netns = "/var/run/netns/cni 1%2e-\u00e9-\udcff"
    result = await added(client, {**envelope(), "netns": netns})
    assert result["interfaces"][2]["sandbox"] == netns


async def test_long_variables_reach_the_daemon(client: aiohttp.ClientSession) -> None:
    # A runtime's CNI_ARGS or CNI_PATH may be long, and percent-encoding triples non-ASCII:
    # more than HTTP servers' usual 8 KiB per header line.
    extra = ";".join(f"K{i}=\u00e9{'x' * 90}" for i in range(100))
    result = await added(client, {**envelope(), "args": "K8S_POD_NAME=pod-1;" + extra})
    assert result["interfaces"][2]["name"] == "eth0"


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.1.0"])
async def test_add_answers_in_the_config_version(
    client: aiohttp.ClientSession, version: str
) -> None:
    result = await added(client, envelope(cniVersion=version))
    assert result["cniVersion"] == version
    assert ("version" in result["ips"][0]) == (version < "1.0.0")


async def test_add_appends_to_prev_result(client: aiohttp.ClientSession) -> None:
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "lo0"}], "ips": [], "routes": []}
    result = await added(client, envelope(prevResult=prev))
    assert result["interfaces"][0] == {"name": "lo0"}
    assert result["ips"][0]["interface"] == 3


async def test_add_without_port_says_who_allocates_it(
    client: aiohttp.ClientSession, dataplane: FakeDataplane
) -> None:
    status, error = await call(client, "add", envelope(pod="pod-unknown"))
    assert status == 404
    assert error["code"] == 3
    assert "pod-unknown" in error["msg"]
    assert "compute agent" in error["msg"]
    assert dataplane.plugged == {}


async def test_add_without_pod_name_is_code_4(client: aiohttp.ClientSession) -> None:
    status, error = await call(client, "add", envelope(pod=None))
    assert (status, error["code"]) == (400, 4)
    assert "K8S_POD_NAME" in error["msg"]


async def test_add_with_existing_ifname_is_an_error(
    client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    dataplane.plug_error = InterfaceExists("interface eth0 already exists in netns /x")
    status, error = await call(client, "add", envelope())
    assert status == 400
    assert error["code"] == 4
    assert "eth0 already exists" in error["msg"]
    assert ports.bound == {}


async def test_add_kernel_failure_is_internal(
    client: aiohttp.ClientSession, dataplane: FakeDataplane
) -> None:
    dataplane.plug_error = DataplaneError("cannot create veth: [Errno 1] Operation not permitted")
    status, error = await call(client, "add", envelope())
    assert (status, error["code"]) == (500, 999)
    assert "Operation not permitted" in error["msg"]


async def test_store_failure_is_try_again_later(
    client: aiohttp.ClientSession, ports: FakePorts
) -> None:
    ports.fail = ConnectionError("database is locked")
    status, error = await call(client, "add", envelope())
    assert (status, error["code"]) == (503, 11)
    assert "database is locked" in error["msg"]


async def test_add_refuses_a_malformed_prev_result_before_plugging(
    client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    status, error = await call(client, "add", envelope(prevResult={"interfaces": "not a list"}))
    assert (status, error["code"]) == (400, 7)
    assert dataplane.plugged == {}
    assert ports.bound == {}


class RefusingPorts(FakePorts):
    """A store that refuses the bindings' writes ``refusals`` times, telling each time."""

    def __init__(self, refusals: int) -> None:
        super().__init__()
        self.refusals = refusals
        self.refused = threading.Semaphore(0)

    def ports_bound(self, container_id: str, host_ifnames: dict[str, str]) -> None:
        if self.refusals:
            self.refusals -= 1
            self.refused.release()
            raise ConnectionError("database is locked")
        super().ports_bound(container_id, host_ifnames)


async def test_add_answers_before_its_binding_is_recorded_and_retries_a_refused_record(
    dataplane: FakeDataplane,
) -> None:
    ports = RefusingPorts(refusals=2)
    async with serving(ports, dataplane) as served:
        status, result = await call(served.session, "add", envelope(), until_recorded=False)
        assert status == 200, result
        # The pod's next call waits for the record, retried until the store took it.
        delete = asyncio.ensure_future(call(served.session, "del", envelope()))
        for _ in range(2):
            assert await asyncio.to_thread(ports.refused.acquire, True, WAIT_S)
        assert await delete == (200, None)
        text = await page(served.session, "/metrics")

    assert ports.calls == ["find_ports", "ports_bound", "pod_unbound"]
    assert "\ncapsa_cni_record_failures_total 2\n" in text
    assert "\ncapsa_cni_adds_unrecorded 0\n" in text
    assert ports.bound == {} and dataplane.plugged == {}


async def test_a_record_the_store_keeps_refusing_ends_as_the_daemon_stops(
    dataplane: FakeDataplane,
) -> None:
    ports = RefusingPorts(refusals=1000)
    async with serving(ports, dataplane) as served:
        status, result = await call(served.session, "add", envelope(), until_recorded=False)
        assert status == 200, result
        assert await asyncio.to_thread(ports.refused.acquire, True, WAIT_S)
        # An operator sees it waiting.
        assert "\ncapsa_cni_adds_unrecorded 1\n" in await page(served.session, "/metrics")
        began = time.monotonic()
        await asyncio.wait_for(served.daemon.stop(), WAIT_S)

    assert time.monotonic() - began < WAIT_S
    assert ports.bound == {}
    # Still plugged: the runtime was told so, and a restarted daemon records the binding.
    assert dataplane.plugged == {("c1", PORT.port_id): PORT.bridge}


async def test_add_with_ipam_is_unsupported_field(client: aiohttp.ClientSession) -> None:
    status, error = await call(client, "add", envelope(ipam={"type": "host-local"}))
    assert (status, error["code"]) == (400, 2)
    assert "ipam" in error["msg"]
    assert "host-local" in error["msg"]


async def test_add_replaces_an_older_sandbox_still_plugged(
    client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    await added(client, envelope(container_id="old"))

    await added(client, envelope(container_id="new"))

    # One attachment holds the port's address and MAC: the new one.
    assert dataplane.plugged == {("new", "port-1"): "capsa0"}
    assert ports.bound == {"port-1": ("new", host_ifname("new", "eth0"))}
    # The old sandbox's late DEL changes nothing.
    assert await call(client, "del", envelope(container_id="old")) == (200, None)
    assert dataplane.plugged == {("new", "port-1"): "capsa0"}
    assert ports.bound == {"port-1": ("new", host_ifname("new", "eth0"))}
    metrics = await page(client, "/metrics")
    assert 'capsa_cni_stale_attachments_removed_total{reason="replaced_sandbox"} 1' in metrics


async def test_a_failed_add_leaves_the_older_sandbox_plugged(
    client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    await added(client, envelope(container_id="old"))
    dataplane.plug_error = InterfaceExists("interface eth0 already exists in netns /x")
    status, _ = await call(client, "add", envelope(container_id="new"))
    assert status == 400
    assert dataplane.plugged == {("old", "port-1"): "capsa0"}
    assert ports.bound == {"port-1": ("old", host_ifname("old", "eth0"))}


async def test_add_again_for_the_same_attachment_keeps_it(
    client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    first = await added(client, envelope())
    assert await added(client, envelope()) == first
    assert dataplane.plugged == {("c1", "port-1"): "capsa0"}
    assert ports.bound == {"port-1": ("c1", host_ifname("c1", "eth0"))}


async def test_add_whose_old_sandbox_is_gone_just_binds(
    client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    # The binding names a sandbox whose veth went with its netns, and no DEL came.
    ports.bound["port-1"] = ("old", host_ifname("old", "eth0"))
    await added(client, envelope(container_id="new"))
    assert dataplane.plugged == {("new", "port-1"): "capsa0"}
    assert ports.bound == {"port-1": ("new", host_ifname("new", "eth0"))}


# ---- DEL ----


async def test_del_unbinds_and_removes_the_unused_bridge(
    served: Served, client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    await added(client, envelope())
    assert await call(client, "del", envelope()) == (200, None)
    assert dataplane.plugged == {}
    assert ports.bound == {}
    await after_answers_done(served)
    assert dataplane.removed_bridges == ["capsa0"]


def watching(dataplane: FakeDataplane, method: str) -> queue.Queue[tuple[Any, Any, float]]:
    """Each call of the data plane's one-argument ``method`` (the daemon's check for an unused
    bridge to remove, its deletion of detached veths), as (its argument, what it returned, when:
    time.monotonic())."""
    calls: queue.Queue[tuple[Any, Any, float]] = queue.Queue()
    original = getattr(dataplane, method)

    def watched(argument: Any) -> Any:
        result = original(argument)
        calls.put((argument, result, time.monotonic()))
        return result

    setattr(dataplane, method, watched)
    return calls


async def test_a_bridge_its_last_pod_left_lingers_and_a_pod_that_comes_meanwhile_keeps_it(
    ports: FakePorts, dataplane: FakeDataplane
) -> None:
    # Long enough for the next ADD to come within it on a loaded machine.
    linger = 1.0
    # A timed wait never ends early, but the two clocks' readings may differ by a rounding.
    clock_slack = 0.01
    checks = watching(dataplane, "remove_bridge_if_unused")
    async with serving(ports, dataplane, bridge_linger=linger) as served:
        client = served.session
        await added(client, envelope())
        left_at = time.monotonic()
        assert await call(client, "del", envelope()) == (200, None)
        await after_answers_done(served)
        assert dataplane.removed_bridges == []
        # The capsule's next sandbox comes within the linger: it finds the bridge, keeps it.
        await added(client, envelope(container_id="c2"))
        # The linger ends: the bridge is checked, and kept.
        bridge, removed, checked_at = await asyncio.to_thread(checks.get, True, linger + WAIT_S)
        assert (bridge, removed) == ("capsa0", False)
        assert checked_at - left_at >= linger - clock_slack
        assert dataplane.removed_bridges == []
        left_at = time.monotonic()
        assert await call(client, "del", envelope(container_id="c2")) == (200, None)
        await after_answers_done(served)
        assert dataplane.removed_bridges == []
        # The linger ends, and nothing came back.
        bridge, removed, checked_at = await asyncio.to_thread(checks.get, True, linger + WAIT_S)
        assert (bridge, removed) == ("capsa0", True)
        assert checked_at - left_at >= linger - clock_slack
        assert dataplane.removed_bridges == ["capsa0"]


async def test_lingering_bridges_go_when_the_daemon_stops(
    ports: FakePorts, dataplane: FakeDataplane
) -> None:
    ports.ports["pod-1"] = [PORT, SECOND_PORT]
    async with serving(ports, dataplane, bridge_linger=600) as served:
        await added(served.session, envelope())
        assert await call(served.session, "del", envelope()) == (200, None)
        await after_answers_done(served)
        assert dataplane.removed_bridges == []
    assert sorted(dataplane.removed_bridges) == ["capsa0", "capsa1"]


async def test_a_del_answers_before_it_removes_the_unused_bridge(
    served: Served, client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    await added(client, envelope())
    may_check, check_ran = threading.Event(), threading.Event()
    remove_bridge_if_unused = dataplane.remove_bridge_if_unused

    def held(name: str) -> bool:
        may_check.wait(WAIT_S)
        try:
            return remove_bridge_if_unused(name)
        finally:
            check_ran.set()

    dataplane.remove_bridge_if_unused = held  # type: ignore[method-assign]

    assert await call(client, "del", envelope()) == (200, None)

    assert not check_ran.is_set(), "the DEL waited for the check of its bridge"
    assert dataplane.plugged == {}
    assert ports.bound == {}
    may_check.set()
    await after_answers_done(served)
    assert dataplane.removed_bridges == ["capsa0"]
    assert dataplane.links == {}


async def test_a_del_forgets_the_bindings_once_the_pod_is_off_the_network(
    client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    # The unbinding wakes the network agent: its pass must not run beside the detach.
    await added(client, envelope())
    ports.calls.clear()
    store_calls_at_detach: list[list[str]] = []
    detach = dataplane.detach

    def watched_detach(container_id: str, ifname: str) -> list[Attachment]:
        store_calls_at_detach.append(list(ports.calls))
        return detach(container_id, ifname)

    dataplane.detach = watched_detach  # type: ignore[method-assign]

    assert await call(client, "del", envelope()) == (200, None)

    assert store_calls_at_detach == [[]]
    assert ports.calls == ["pod_unbound"]
    assert ports.bound == {}


async def test_a_del_whose_unbinding_failed_is_done_by_the_next_one(
    served: Served, client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    await added(client, envelope())
    ports.fail = ConnectionError("database is locked")

    status, error = await call(client, "del", envelope())

    assert (status, error["code"]) == (503, 11)
    assert dataplane.plugged == {}, "the pod stays off the network"
    assert host_ifname("c1", "eth0") in dataplane.links, "no deletion of a failed DEL's veth"
    ports.fail = None
    assert await call(client, "del", envelope()) == (200, None)
    assert ports.bound == {}
    await after_answers_done(served)
    assert dataplane.links == {}


async def test_a_del_whose_detach_failed_is_done_by_the_next_one(
    served: Served, client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    await added(client, envelope())
    name = host_ifname("c1", "eth0")
    dataplane.remove_errors[name] = DataplaneError("Device or resource busy")

    status, error = await call(client, "del", envelope())

    assert (status, error["code"]) == (500, 999)
    assert "Device or resource busy" in error["msg"]
    del dataplane.remove_errors[name]
    assert await call(client, "del", envelope()) == (200, None)
    assert dataplane.plugged == {}
    assert ports.bound == {}
    await after_answers_done(served)
    assert dataplane.links == {}
    assert dataplane.removed_bridges == ["capsa0"]


def holding_removals(
    dataplane: FakeDataplane, begun: threading.Event | None = None
) -> tuple[threading.Event, threading.Event]:
    """Makes the data plane's deletion of a detached veth wait for the first event; the second
    is set once it has run, ``begun`` once it is called."""
    may_remove, removal_ran = threading.Event(), threading.Event()
    remove_detached = dataplane.remove_detached

    def held(host_names: Sequence[str]) -> list[str]:
        if begun is not None:
            begun.set()
        may_remove.wait(WAIT_S)
        try:
            return remove_detached(host_names)
        finally:
            removal_ran.set()

    dataplane.remove_detached = held  # type: ignore[method-assign]
    return may_remove, removal_ran


async def test_del_answers_once_the_pod_is_off_the_network_and_removes_the_veth_after(
    client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    await added(client, envelope())
    may_remove, removal_ran = holding_removals(dataplane)
    name = host_ifname("c1", "eth0")

    assert await call(client, "del", envelope()) == (200, None)

    assert dataplane.links[name].bridge is None, "answered before the veth left its bridge"
    assert ports.bound == {}
    may_remove.set()
    assert await asyncio.to_thread(removal_ran.wait, WAIT_S)
    assert name not in dataplane.links


async def test_an_add_right_after_a_del_ends_plugged(
    served: Served, client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    await added(client, envelope())
    may_remove, _ = holding_removals(dataplane)
    assert await call(client, "del", envelope()) == (200, None)

    # The ADD finds the DEL's deletion under way (and waits for it), or not begun yet (and takes
    # the veth back): either way the veth is there once the DEL's work is over.
    adding = asyncio.create_task(added(client, envelope()))
    may_remove.set()
    await asyncio.wait_for(adding, CALL_TIMEOUT_S)
    await after_answers_done(served)

    assert dataplane.plugged == {("c1", "port-1"): "capsa0"}
    assert host_ifname("c1", "eth0") in dataplane.links, "the DEL deleted the ADD's veth"


async def added_then_deleted(served: Served) -> None:
    """An ADD, the DEL of its attachment, and the work the daemon does after the DEL's answer."""
    await added(served.session, envelope())
    assert await call(served.session, "del", envelope()) == (200, None)
    await after_answers_done(served)


async def test_a_dels_veths_are_deleted_only_once_their_wait_is_over(
    ports: FakePorts, dataplane: FakeDataplane
) -> None:
    removals = watching(dataplane, "remove_detached")
    async with serving(ports, dataplane, detached_veth_wait=0.3) as served:
        began = time.monotonic()
        await added_then_deleted(served)
        # The runtime deletes the pod's netns meanwhile, which takes the veths with it.
        assert removals.empty(), "deleted right after the answer"

        _, removed, at = await asyncio.to_thread(removals.get, timeout=WAIT_S)

    assert removed == [host_ifname("c1", "eth0")] and at - began >= 0.3
    assert dataplane.links == {} and dataplane.removed_bridges == ["capsa0"]


async def test_an_add_of_the_attachment_takes_its_veths_back_from_a_waiting_deletion(
    ports: FakePorts, dataplane: FakeDataplane
) -> None:
    removals = watching(dataplane, "remove_detached")
    async with serving(ports, dataplane, detached_veth_wait=60.0) as served:
        await added_then_deleted(served)

        # Without waiting for the deletion's minute: it has not begun.
        await asyncio.wait_for(added(served.session, envelope()), CALL_TIMEOUT_S)
    # Stopping runs the deletions still waiting: this one has nothing left to delete.

    assert dataplane.plugged == {("c1", "port-1"): "capsa0"}
    assert host_ifname("c1", "eth0") not in dataplane.detached
    assert removals.empty() and dataplane.removed_bridges == []


async def test_a_stopping_daemon_deletes_the_veths_still_waiting_at_once(
    ports: FakePorts, dataplane: FakeDataplane
) -> None:
    removals = watching(dataplane, "remove_detached")
    async with serving(ports, dataplane, detached_veth_wait=60.0) as served:
        await added_then_deleted(served)
        stopping = time.monotonic()

    _, removed, at = removals.get_nowait()
    assert removed == [host_ifname("c1", "eth0")] and at - stopping < WAIT_S
    assert dataplane.links == {} and dataplane.removed_bridges == ["capsa0"]


async def test_a_stopping_daemon_removes_the_bridge_its_waiting_deletion_leaves_unused(
    ports: FakePorts, dataplane: FakeDataplane
) -> None:
    # The deletion's end starts the bridge's linger, which the stop cuts short too.
    async with serving(ports, dataplane, detached_veth_wait=60.0, bridge_linger=600.0) as served:
        await added_then_deleted(served)
        assert dataplane.removed_bridges == []

    assert dataplane.links == {} and dataplane.removed_bridges == ["capsa0"]


async def test_a_second_del_answers_while_the_first_ones_deletion_runs(
    client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    await added(client, envelope())
    may_remove, removal_ran = holding_removals(dataplane)
    assert await call(client, "del", envelope()) == (200, None)
    calls = len(ports.calls)

    # containerd's RemovePodSandbox sends it again, with or without the netns.
    assert await call(client, "del", envelope()) == (200, None)
    assert await call(client, "del", {**envelope(), "netns": ""}) == (200, None)

    assert not removal_ran.is_set(), "the second DEL waited for the veth's deletion"
    assert ports.calls[calls:] == [], "nothing was left for the store to do"
    may_remove.set()
    assert await asyncio.to_thread(removal_ran.wait, WAIT_S)
    assert dataplane.links == {}
    assert ports.bound == {}


async def test_a_new_sandbox_of_the_capsule_does_not_wait_for_the_old_ones_veth_deletion(
    client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    await added(client, envelope(container_id="old"))
    may_remove, removal_ran = holding_removals(dataplane)
    assert await call(client, "del", envelope(container_id="old")) == (200, None)

    await added(client, envelope(container_id="new"))

    assert not removal_ran.is_set(), "the new sandbox's ADD waited for the old veth's deletion"
    may_remove.set()
    assert await asyncio.to_thread(removal_ran.wait, WAIT_S)
    assert dataplane.plugged == {("new", "port-1"): "capsa0"}
    assert set(dataplane.links) == {host_ifname("new", "eth0")}
    assert ports.bound == {"port-1": ("new", host_ifname("new", "eth0"))}


async def test_an_add_of_the_same_attachment_plugs_only_once_the_del_deleted_its_veth(
    client: aiohttp.ClientSession,
    dataplane: FakeDataplane,
    ports: FakePorts,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await added(client, envelope())
    deletion_begun = threading.Event()
    may_remove, removal_ran = holding_removals(dataplane, deletion_begun)
    assert await call(client, "del", envelope()) == (200, None)
    # Under way: an ADD before it began would take the veth back instead (a test of its own).
    assert await asyncio.to_thread(deletion_begun.wait, WAIT_S)
    # The ADD either waits for the deletion (it says so) or plugs at once: whichever comes first
    # releases the deletion, with no clock involved. Both happen on the daemon's threads.
    add_waits_or_plugs = threading.Event()
    removal_done_at_plug: list[bool] = []
    plug = dataplane.plug

    def watched_plug(*args: Any, **kwargs: Any) -> list[PluggedPort]:
        removal_done_at_plug.append(removal_ran.is_set())
        add_waits_or_plugs.set()
        return plug(*args, **kwargs)

    dataplane.plug = watched_plug  # type: ignore[method-assign]

    class WaitSeen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for a DEL's deletion" in record.getMessage():
                add_waits_or_plugs.set()

    caplog.set_level(logging.INFO, logger="capsa.cni.daemon")
    handler = WaitSeen()
    logging.getLogger("capsa.cni.daemon").addHandler(handler)
    try:
        adding = asyncio.create_task(added(client, envelope()))
        assert await asyncio.to_thread(add_waits_or_plugs.wait, WAIT_S)
        may_remove.set()
        await asyncio.wait_for(adding, CALL_TIMEOUT_S)
    finally:
        logging.getLogger("capsa.cni.daemon").removeHandler(handler)

    assert removal_done_at_plug == [True], "the ADD plugged while the DEL deleted its veth"
    assert dataplane.plugged == {("c1", "port-1"): "capsa0"}
    assert ports.bound == {"port-1": ("c1", host_ifname("c1", "eth0"))}


async def test_a_del_costs_one_round_trip_to_the_store(
    client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    await added(client, envelope())
    ports.calls.clear()
    assert await call(client, "del", envelope()) == (200, None)
    assert ports.calls == ["pod_unbound"]
    assert ports.bound == {}

    # A sandbox whose veth is gone (with its netns) and still bound: the pod's name finds it.
    ports.bound["port-1"] = ("c2", host_ifname("c2", "eth0"))
    ports.calls.clear()
    assert await call(client, "del", {**envelope(container_id="c2"), "netns": ""}) == (200, None)
    assert ports.calls == ["pod_unbound"]
    assert ports.bound == {}


async def test_del_without_pod_name_finds_the_port_on_the_veth(
    client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    await added(client, envelope())
    assert await call(client, "del", envelope(pod=None)) == (200, None)
    assert dataplane.plugged == {}
    assert ports.bound == {}


@pytest.mark.parametrize(
    "body",
    [
        envelope(),
        {**envelope(), "netns": ""},
        {**envelope(), "netns": "/var/run/netns/gone"},
        envelope(container_id="never-seen"),
        envelope(pod="pod-without-port"),
        envelope(pod=None),
        envelope(cniVersion="0.3.1"),
    ],
)
async def test_del_always_succeeds(client: aiohttp.ClientSession, body: dict[str, Any]) -> None:
    assert await call(client, "del", body) == (200, None)
    assert await call(client, "del", body) == (200, None)


async def test_del_of_an_old_sandbox_keeps_the_new_binding(
    client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    await added(client, envelope(container_id="old"))
    await call(client, "del", envelope(container_id="old"))
    await added(client, envelope(container_id="new"))
    assert await call(client, "del", envelope(container_id="old")) == (200, None)
    assert ports.bound == {"port-1": ("new", host_ifname("new", "eth0"))}
    assert dataplane.plugged == {("new", "port-1"): "capsa0"}


async def test_calls_for_one_capsule_never_overlap(
    client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    # Each plug waits for a second one to run beside it: the two capsules' plugs meet, and two
    # plugs of one capsule would too if they could overlap (a timeout ends a plug left alone).
    dataplane.meeting = threading.Barrier(2, timeout=10)
    ports.ports["pod-2"] = [dataclasses.replace(PORT, port_id="port-2")]
    results = await asyncio.gather(
        call(client, "add", envelope(container_id="a1")),
        call(client, "add", envelope(container_id="a2")),
        call(client, "add", envelope(container_id="b1", pod="pod-2")),
        call(client, "add", envelope(container_id="b2", pod="pod-2")),
    )
    assert [status for status, _ in results] == [200] * 4
    assert dataplane.most_active == {"port-1": 1, "port-2": 1}
    assert dataplane.most_active_overall == 2, "the two capsules must run side by side"


# ---- a capsule on two networks ----


@pytest.fixture
def two_networks(ports: FakePorts) -> FakePorts:
    ports.ports["pod-1"] = [PORT, SECOND_PORT]
    return ports


async def test_add_plugs_every_port_of_the_capsule_in_one_result(
    client: aiohttp.ClientSession, two_networks: FakePorts, dataplane: FakeDataplane
) -> None:
    result = await added(client, envelope())

    names = [i["name"] for i in result["interfaces"]]
    assert names == [
        "capsa0",
        host_ifname("c1", "eth0"),
        "eth0",
        "capsa1",
        host_ifname("c1", "eth1"),
        "eth1",
    ]
    assert [(names[ip["interface"]], ip["address"]) for ip in result["ips"]] == [
        ("eth0", "10.217.0.5/16"),
        ("eth1", "10.218.0.7/24"),
    ]
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.217.0.1"}]
    assert dataplane.plugged == {("c1", "port-1"): "capsa0", ("c1", "port-2"): "capsa1"}
    assert two_networks.bound == {
        "port-1": ("c1", host_ifname("c1", "eth0")),
        "port-2": ("c1", host_ifname("c1", "eth1")),
    }
    # CHECK compares both with the result and the kernel.
    checked: list[tuple[str, str]] = []
    dataplane.check = lambda container_id, netns, interfaces: checked.extend(  # type: ignore[method-assign]
        (ifname, port.port_id) for ifname, port in interfaces
    )
    assert await call(client, "check", envelope(prevResult=result)) == (200, None)
    assert checked == [("eth0", "port-1"), ("eth1", "port-2")]
    result["ips"][1]["address"] = "10.218.0.99/24"
    status, error = await call(client, "check", envelope(prevResult=result))
    assert status == 500 and "eth1" in error["msg"] and "10.218.0.99/24" in error["msg"]


async def test_del_unplugs_and_unbinds_every_port_of_the_capsule(
    served: Served, client: aiohttp.ClientSession, two_networks: FakePorts, dataplane: FakeDataplane
) -> None:
    await added(client, envelope())
    may_remove, removal_ran = holding_removals(dataplane)

    assert await call(client, "del", envelope(pod=None)) == (200, None)

    assert dataplane.plugged == {}
    assert two_networks.bound == {}
    assert not removal_ran.is_set(), "the DEL waited for the deletion of its veths"
    may_remove.set()
    await after_answers_done(served)
    assert dataplane.links == {}
    assert sorted(dataplane.removed_bridges) == ["capsa0", "capsa1"]


async def test_a_new_sandbox_replaces_every_port_of_the_old_one_and_a_stale_del_keeps_it(
    client: aiohttp.ClientSession, two_networks: FakePorts, dataplane: FakeDataplane
) -> None:
    await added(client, envelope(container_id="old"))
    await added(client, envelope(container_id="new"))
    assert await call(client, "del", envelope(container_id="old")) == (200, None)

    assert dataplane.plugged == {("new", "port-1"): "capsa0", ("new", "port-2"): "capsa1"}
    assert {cid for cid, _ in two_networks.bound.values()} == {"new"}


async def test_gc_keeps_every_interface_of_a_valid_attachment(
    client: aiohttp.ClientSession, two_networks: FakePorts, dataplane: FakeDataplane
) -> None:
    two_networks.ports["pod-2"] = [
        dataclasses.replace(PORT, port_id="port-3"),
        dataclasses.replace(SECOND_PORT, port_id="port-4"),
    ]
    await added(client, envelope(container_id="kept"))
    await added(client, envelope(container_id="stale", pod="pod-2"))

    assert await call(client, "gc", gc_envelope(("kept", "eth0"))) == (200, None)

    assert dataplane.plugged == {("kept", "port-1"): "capsa0", ("kept", "port-2"): "capsa1"}
    assert set(two_networks.bound) == {"port-1", "port-2"}


async def test_add_refuses_an_ifname_that_cannot_be_numbered_for_every_network(
    client: aiohttp.ClientSession, two_networks: FakePorts, dataplane: FakeDataplane
) -> None:
    status, error = await call(client, "add", {**envelope(), "ifname": "abcdefghijklmn9"})
    assert (status, error["code"]) == (400, 4)
    assert "2 networks" in error["msg"]
    assert dataplane.plugged == {}


# ---- errors common to the commands ----


async def test_bad_json_body_is_code_6(client: aiohttp.ClientSession) -> None:
    async with client.post("/cni/add", data=b"{not json") as response:
        assert (await response.json())["code"] == 6


async def test_unsupported_version_is_code_1_and_echoes_it(client: aiohttp.ClientSession) -> None:
    _, error = await call(client, "add", envelope(cniVersion="2.0.0"))
    assert (error["code"], error["cniVersion"]) == (1, "2.0.0")


# ---- CHECK ----


async def test_check_compares_prev_result_port_and_kernel(
    client: aiohttp.ClientSession, dataplane: FakeDataplane
) -> None:
    checked: list[tuple[str, str, str]] = []
    dataplane.check = lambda container_id, netns, interfaces: checked.extend(  # type: ignore[method-assign]
        (container_id, ifname, port.port_id) for ifname, port in interfaces
    )
    result = await added(client, envelope())
    assert await call(client, "check", envelope(prevResult=result)) == (200, None)
    assert checked == [("c1", "eth0", "port-1")]


async def test_check_reports_a_prev_result_that_differs_from_the_port(
    client: aiohttp.ClientSession,
) -> None:
    result = await added(client, envelope())
    result["ips"][0]["address"] = "10.217.9.9/16"
    status, error = await call(client, "check", envelope(prevResult=result))
    assert (status, error["code"]) == (500, 999)
    assert "10.217.9.9/16" in error["msg"]
    assert str(PORT.ip) in error["msg"]


async def test_check_reports_what_the_kernel_lacks(
    client: aiohttp.ClientSession, dataplane: FakeDataplane
) -> None:
    def fail(*_: Any, **__: Any) -> None:
        raise DataplaneError("eth0 lacks 10.217.0.5/16")

    dataplane.check = fail  # type: ignore[method-assign]
    result = await added(client, envelope())
    status, error = await call(client, "check", envelope(prevResult=result))
    assert (status, error["code"]) == (500, 999)
    assert "eth0 lacks 10.217.0.5/16" in error["msg"]


async def test_check_without_prev_result_is_code_7(client: aiohttp.ClientSession) -> None:
    await added(client, envelope())
    status, error = await call(client, "check", envelope())
    assert (status, error["code"]) == (400, 7)
    assert "prevResult" in error["msg"]


async def test_check_is_not_in_0_3_1(client: aiohttp.ClientSession) -> None:
    result = await added(client, envelope(cniVersion="0.3.1"))
    _, error = await call(client, "check", envelope(cniVersion="0.3.1", prevResult=result))
    assert error["code"] == 1
    assert "0.4.0" in error["msg"]


# ---- GC ----


async def test_gc_removes_only_this_owners_stale_attachments(
    served: Served, client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    ports.ports["pod-2"] = [dataclasses.replace(PORT, port_id="port-2", bridge="capsa1")]
    await added(client, envelope(container_id="kept"))
    await added(client, envelope(container_id="stale", pod="pod-2"))
    # Another capsa instance's attachment: same network name, another daemon.
    ports.ports["pod-3"] = [dataclasses.replace(PORT, port_id="port-3")]
    async with serving(ports, dataplane) as other:
        assert other.daemon.address != served.daemon.address
        await added(other.session, envelope(container_id="foreign", pod="pod-3"))

    assert await call(client, "gc", gc_envelope(("kept", "eth0"))) == (200, None)

    assert dataplane.plugged == {("kept", "port-1"): "capsa0", ("foreign", "port-3"): "capsa0"}
    assert "port-2" not in ports.bound
    assert dataplane.removed_bridges == ["capsa1"]
    metrics = await page(client, "/metrics")
    assert 'capsa_cni_stale_attachments_removed_total{reason="gc"} 1' in metrics


async def test_gc_accepts_libcni_legacy_key(
    client: aiohttp.ClientSession, dataplane: FakeDataplane
) -> None:
    await added(client, envelope(container_id="kept"))
    body = gc_envelope()
    body["config"]["cni.dev/attachments"] = body["config"].pop("cni.dev/valid-attachments")
    body["config"]["cni.dev/attachments"].append({"containerID": "kept", "ifname": "eth0"})
    assert await call(client, "gc", body) == (200, None)
    assert dataplane.plugged == {("kept", "port-1"): "capsa0"}


async def test_gc_carries_on_past_failures_and_reports_them(
    client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    ports.ports["pod-2"] = [dataclasses.replace(PORT, port_id="port-2")]
    await added(client, envelope(container_id="a"))
    await added(client, envelope(container_id="b", pod="pod-2"))
    stuck = host_ifname("a", "eth0")
    dataplane.remove_errors[stuck] = DataplaneError("Device or resource busy")

    status, error = await call(client, "gc", gc_envelope())

    assert (status, error["code"]) == (500, 999)
    assert "1 stale attachments" in error["msg"]
    assert stuck in error["details"]
    assert "Device or resource busy" in error["details"]
    assert dataplane.plugged == {("a", "port-1"): "capsa0"}


@pytest.mark.parametrize(
    ("config", "code"),
    [
        ({"cniVersion": "1.0.0", "cni.dev/valid-attachments": []}, 1),
        ({}, 7),
        ({"cni.dev/valid-attachments": [{"containerID": "x"}]}, 7),
    ],
)
async def test_gc_refuses_what_it_cannot_trust(
    client: aiohttp.ClientSession, dataplane: FakeDataplane, config: dict[str, Any], code: int
) -> None:
    await added(client, envelope())
    _, error = await call(client, "gc", network_envelope(**config))
    assert error["code"] == code
    assert dataplane.plugged == {("c1", "port-1"): "capsa0"}


# ---- STATUS, health, readiness, metrics ----


async def test_status_when_ready(client: aiohttp.ClientSession) -> None:
    assert await call(client, "status", network_envelope()) == (200, None)


async def test_status_not_ready_is_code_50(
    monkeypatch: pytest.MonkeyPatch, ports: FakePorts
) -> None:
    reason = "the daemon lacks CAP_NET_ADMIN: run capsa as root"
    monkeypatch.setattr("capsa.cni.daemon._lacks_net_admin", lambda: reason)
    async with serving(ports, FakeDataplane()) as served:
        status, error = await call(served.session, "status", network_envelope())
    assert (status, error["code"]) == (503, 50)
    assert reason in error["msg"]


async def test_health(client: aiohttp.ClientSession) -> None:
    async with client.get("/healthz") as response:
        assert response.status == 200
        assert (await response.json())["status"] == "alive"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/cni/add", 405),
        ("POST", "/healthz", 405),
        ("POST", "/cni/unknown", 404),
        ("GET", "/nowhere", 404),
    ],
)
async def test_unknown_paths_and_methods_are_refused(
    client: aiohttp.ClientSession, dataplane: FakeDataplane, method: str, path: str, status: int
) -> None:
    async with client.request(method, path, headers=cni_headers(envelope())) as response:
        assert response.status == status
    assert dataplane.plugged == {}


@pytest.mark.parametrize("missing", ["", "the daemon lacks CAP_NET_ADMIN: run capsa as root"])
async def test_readiness_says_why_not(
    monkeypatch: pytest.MonkeyPatch, ports: FakePorts, missing: str
) -> None:
    monkeypatch.setattr("capsa.cni.daemon._lacks_net_admin", lambda: missing)
    async with serving(ports, FakeDataplane()) as served, served.session.get("/readyz") as response:
        status, body = response.status, await response.json()
    if missing:
        assert (status, body["reason"]) == (503, missing)
    else:
        assert (status, body["status"]) == (200, "ready")


async def test_metrics_count_calls_errors_and_latency(
    client: aiohttp.ClientSession, dataplane: FakeDataplane
) -> None:
    dataplane.delay = 0.03
    await added(client, envelope())
    await call(client, "add", envelope(pod="pod-unknown"))
    await call(client, "del", envelope())

    async with client.get("/metrics") as response:
        content_type = response.headers["Content-Type"]
        text = await response.text()

    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert 'capsa_cni_requests_total{command="ADD"} 2' in text
    assert 'capsa_cni_requests_total{command="DEL"} 1' in text
    assert 'capsa_cni_requests_total{command="GC"} 0' in text
    assert 'capsa_cni_errors_total{command="ADD",code="3"} 1' in text
    assert 'capsa_cni_requests_in_flight{command="ADD"} 0' in text
    # The ADD that plugged took at least the plug's 30 ms; the failed one did not.
    assert 'capsa_cni_request_duration_seconds_bucket{command="ADD",le="0.025"} 1' in text
    assert 'capsa_cni_request_duration_seconds_bucket{command="ADD",le="+Inf"} 2' in text
    assert 'capsa_cni_request_duration_seconds_count{command="DEL"} 1' in text


async def test_metrics_time_the_steps_of_add_and_del(
    served: Served, dataplane: FakeDataplane
) -> None:
    dataplane.delay = 0.03
    await added(served.session, envelope())
    await call(served.session, "add", envelope(pod="pod-unknown"))
    await call(served.session, "del", envelope())
    # A call's steps are counted once its answer is out.
    await after_answers_done(served)

    text = await page(served.session, "/metrics")

    def count(command: str, step: str) -> str:
        return f'capsa_cni_step_duration_seconds_count{{command="{command}",step="{step}"}}'

    # Both ADDs looked their ports up; the one that found none failed there.
    assert f"{count('ADD', 'lookup')} 2" in text
    assert f"{count('ADD', 'plug')} 1" in text
    assert f"{count('ADD', 'record')} 1" in text
    assert f"{count('DEL', 'detach')} 1" in text
    assert f"{count('DEL', 'unbind')} 1" in text
    # The plug took the data plane's 30 ms; no ADD waited for the firewall.
    plug_bucket = 'capsa_cni_step_duration_seconds_bucket{command="ADD",step="plug",le="0.025"}'
    assert f"{plug_bucket} 0" in text
    assert 'step="wait"' not in text


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


async def test_daemon_on_a_unix_socket(ports: FakePorts) -> None:
    with short_directory() as directory:
        # The socket's directory is made if missing.
        path = directory / "run" / "cni.sock"
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


async def test_an_add_makes_its_bridges_kept_by_its_daemon(
    served: Served, client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    ports.ports["pod-1"] = [PORT, SECOND_PORT]
    await added(client, envelope())
    keeper = bridge_keeper(served.daemon.address)
    assert dataplane.bridges == {"capsa0": keeper, "capsa1": keeper}
    assert bridge_keeper("unix:/run/other/cni.sock") != keeper


@pytest.mark.parametrize("linger", [0.0, 600.0])
async def test_a_daemon_that_starts_retires_the_unused_bridges_it_keeps(
    ports: FakePorts, linger: float
) -> None:
    with short_directory() as directory:
        # What a daemon killed while its bridges lingered left: its own unused bridge, one of
        # its own still in use, and another daemon's unused one.
        address = f"unix:{directory / 'cni.sock'}"
        dataplane = FakeDataplane()
        dataplane.bridges = {
            "cbr-left": bridge_keeper(address),
            "cbr-used": bridge_keeper(address),
            "cbr-other": bridge_keeper("unix:/run/other/cni.sock"),
        }
        dataplane.links["capsa-used"] = Attachment(
            "capsa-used", "cbr-used", AttachmentTag("owner", "port-9", "c9")
        )
        async with serving(ports, dataplane, listen=address, bridge_linger=linger):
            # With a linger, a pod that comes meanwhile may still keep it.
            assert dataplane.removed_bridges == ([] if linger else ["cbr-left"])
    assert dataplane.removed_bridges == ["cbr-left"]
    assert set(dataplane.bridges) == {"cbr-used", "cbr-other"}


async def test_a_daemon_that_starts_records_the_bindings_its_veths_tags_tell(
    ports: FakePorts, dataplane: FakeDataplane
) -> None:
    # What a daemon killed after ADDs' answers and before their records left behind.
    third = dataclasses.replace(PORT, port_id="port-3")
    ports.ports = {"pod-1": [PORT], "pod-2": [SECOND_PORT], "pod-3": [third]}
    ports.bound = {SECOND_PORT.port_id: ("c2", "capsa-c2")}
    links = {
        # Unbound in the store: recorded.
        "capsa-c1": Attachment("capsa-c1", "capsa0", AttachmentTag("o", PORT.port_id, "c1")),
        # The store binds its port to another veth that is there: left alone.
        "capsa-c2": Attachment("capsa-c2", "capsa1", AttachmentTag("o", SECOND_PORT.port_id, "c2")),
        "capsa-c2b": Attachment(
            "capsa-c2b", "capsa1", AttachmentTag("o", SECOND_PORT.port_id, "c2b")
        ),
        # Detached by a DEL: on its way out.
        "capsa-c3": Attachment("capsa-c3", None, AttachmentTag("o", third.port_id, "c3")),
        # Not a port of this store (another capsa's), and a veth with no tag.
        "capsa-c4": Attachment("capsa-c4", "capsa0", AttachmentTag("o", "port-4", "c4")),
        "capsa-c5": Attachment("capsa-c5", "capsa0", None),
    }
    dataplane.links = dict(links)

    async with serving(ports, dataplane):
        assert ports.bound == {
            PORT.port_id: ("c1", "capsa-c1"),
            SECOND_PORT.port_id: ("c2", "capsa-c2"),
        }
    assert ports.calls == ["bindings_of", "ports_bound"]


async def test_daemon_on_a_free_tcp_port(ports: FakePorts) -> None:
    dataplane = FakeDataplane()
    daemon = CniDaemon(ports, "127.0.0.1:0", dataplane=dataplane)
    await daemon.start()
    try:
        host, port = daemon.address.rsplit(":", 1)
        assert host == "127.0.0.1"
        assert int(port) > 0
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{daemon.address}/healthz") as response:
                assert response.status == 200
            call = envelope()
            async with session.post(
                f"http://{daemon.address}/cni/add",
                data=json.dumps(call["config"]),
                headers={
                    "CNI-Container-Id": call["containerId"],
                    "CNI-Netns": call["netns"],
                    "CNI-Ifname": call["ifname"],
                    "CNI-Args": call["args"],
                },
            ) as response:
                assert response.status == 200, await response.text()
        # Its attachments and bridges are named after the port it got, as its launcher names it.
        [attachment] = dataplane.links.values()
        assert attachment.tag is not None
        assert attachment.tag.owner == attachment_owner(daemon.address, "capsa")
        assert dataplane.bridges == {PORT.bridge: bridge_keeper(daemon.address)}
    finally:
        await daemon.stop()


async def test_a_daemon_listening_at_a_host_name_is_addressed_by_it(ports: FakePorts) -> None:
    # As capsa-cni's launcher names it, which is also the keeper of the bridges the daemon makes.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = CniDaemon(ports, f"localhost:{port}", dataplane=FakeDataplane())
    await daemon.start()
    try:
        assert daemon.address == f"localhost:{port}"
    finally:
        await daemon.stop()


async def test_a_daemon_on_a_unix_socket_is_addressed_as_configured(ports: FakePorts) -> None:
    # A path configured with a doubled slash keeps it: the bridges' keeper is its text.
    with short_directory() as directory:
        listen = f"unix:{directory}//cni.sock"
        daemon = CniDaemon(ports, listen, dataplane=FakeDataplane())
        await daemon.start()
        try:
            assert daemon.address == listen
        finally:
            await daemon.stop()


async def test_after_an_add_of_the_same_attachment_a_del_does_its_work_again(
    served: Served, client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    await added(client, envelope())
    assert await call(client, "del", envelope()) == (200, None)
    await after_answers_done(served)
    await added(client, envelope())
    assert ports.bound == {"port-1": ("c1", host_ifname("c1", "eth0"))}

    assert await call(client, "del", envelope()) == (200, None)

    assert dataplane.plugged == {}
    assert ports.bound == {}
    await after_answers_done(served)
    assert dataplane.links == {}


async def test_a_veth_that_could_not_be_deleted_is_deleted_by_the_next_del(
    served: Served, client: aiohttp.ClientSession, dataplane: FakeDataplane, ports: FakePorts
) -> None:
    await added(client, envelope())
    remove_detached = dataplane.remove_detached

    def busy_once(host_names: Sequence[str]) -> list[str]:
        dataplane.remove_detached = remove_detached  # type: ignore[method-assign]
        raise DataplaneError("Device or resource busy")

    dataplane.remove_detached = busy_once  # type: ignore[method-assign]
    assert await call(client, "del", envelope()) == (200, None)
    await after_answers_done(served)
    assert host_ifname("c1", "eth0") in dataplane.links

    assert await call(client, "del", envelope()) == (200, None)
    await after_answers_done(served)

    assert dataplane.links == {}
    assert ports.bound == {}


class UnixHTTPConnection(http.client.HTTPConnection):
    """A blocking HTTP connection to a unix socket."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("capsa-cni-daemon", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


def blocking_call(path: Path, command: str, envelope: dict[str, Any]) -> tuple[int, Any]:
    """:func:`call` without the event loop: a blocking client on the calling thread."""
    connection = UnixHTTPConnection(path, CALL_TIMEOUT_S)
    try:
        body = json.dumps(envelope["config"]).encode()
        connection.request("POST", f"/cni/{command}", body=body, headers=cni_headers(envelope))
        response = connection.getresponse()
        text = response.read()
        return response.status, (json.loads(text) if text else None)
    finally:
        connection.close()


async def test_cni_calls_are_served_while_the_event_loop_is_blocked(
    store: Store, make_capsule: Callable[..., Capsule], dataplane: FakeDataplane
) -> None:
    # capsa up's event loop also runs the API, the scheduler and the agents: a runtime's ADD and
    # DEL must not wait for a turn of it, not even for the store's reads and writes.
    await store.hosts.register("h1", "http://h1", 1000, 1000, ("runc",))
    network = NetworkService(store, "10.50.0.0/24", 1500)
    capsule = make_capsule()
    await store.capsules.create(capsule)
    assert await store.hosts.claim(capsule.uuid, "h1", 100, 64)
    await network.allocate_ports(capsule.uuid, "p1", "h1")
    [port] = await asyncio.to_thread(network.find_ports, capsule.uuid)
    loop_turns: list[str] = []
    answers: list[tuple[int, Any]] = []
    bound_after_add: list[str | None] = []

    def runtime(socket_path: Path) -> None:
        # capsa-cni as a runtime runs it: one blocking call after another.
        answers.append(blocking_call(socket_path, "add", envelope(pod=capsule.uuid)))
        # Recorded right after the answer, on the daemon's thread.
        deadline = time.monotonic() + WAIT_S
        while (found := network.find_ports(capsule.uuid)[0]).bound_container_id is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)
        bound_after_add.append(found.bound_container_id)
        answers.append(blocking_call(socket_path, "del", envelope(pod=capsule.uuid)))

    async with serving(network, dataplane) as served:
        asyncio.get_running_loop().call_soon(loop_turns.append, "a turn")
        calls = threading.Thread(target=runtime, args=(served.socket_path,), daemon=True)
        calls.start()
        # Blocks the event loop until the runtime's calls are answered (or the wait ends).
        calls.join(timeout=CALL_TIMEOUT_S)
        assert not calls.is_alive(), "the calls were not answered while the event loop waited"
        assert loop_turns == [], "the event loop ran"

        [(add_status, result), del_answer] = answers
        assert add_status == 200, result
        assert result["ips"][0]["address"] == str(port.ip)
        assert bound_after_add == ["c1"]
        assert del_answer == (200, None)
        assert dataplane.plugged == {}
        await asyncio.sleep(0)
        assert loop_turns == ["a turn"]
    [found] = await asyncio.to_thread(network.find_ports, capsule.uuid)
    assert found.bound_container_id is None
