"""capsa-cni-daemon: binds capsules' ports into pod netns when containerd asks through capsa-cni.

``capsa-cni`` forwards each CNI call as ``POST /cni/add``, ``/cni/del`` or ``/cni/check`` (see
:mod:`capsa.cni.protocol` for the body). ADD finds the capsule's port by the sandbox name
(``K8S_POD_NAME`` in CNI_ARGS, the capsule's uuid), plugs it with the data plane, records the
binding and answers the CNI result; DEL undoes that and is always safe to repeat. ``GET /healthz``
says the daemon is alive, ``GET /readyz`` that it can bind ports.

Run it next to the API and the agent::

    daemon = CniDaemon(ports, cfg.cni_daemon_address)
    await daemon.start()
    ...
    await daemon.stop()

Calls for one capsule are serialised; calls for different capsules run side by side, their netlink
work on a small thread pool of the daemon's own.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from capsa.cni.protocol import (
    DEFAULT_VERSION,
    CniError,
    CniRequest,
    ErrorCode,
    build_result,
    parse_request,
)
from capsa.log import get_logger
from capsa.network.dataplane import Dataplane, DataplaneError, InterfaceExists, NetnsNotFound
from capsa.network.types import PortBinding, PortSource

log = get_logger(__name__)

T = TypeVar("T")

DEFAULT_WORKERS = 8
# Bit of CAP_NET_ADMIN in /proc/self/status CapEff.
_CAP_NET_ADMIN = 12
_HTTP_STATUS = {
    ErrorCode.UNKNOWN_CONTAINER: 404,
    ErrorCode.TRY_AGAIN_LATER: 503,
    ErrorCode.INTERNAL: 500,
}


class _KeyedLocks:
    """One asyncio lock per key, forgotten when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]


class _CniService:
    def __init__(self, ports: PortSource, dataplane: Dataplane, executor: ThreadPoolExecutor):
        self._ports = ports
        self._dataplane = dataplane
        self._executor = executor
        self._pod_locks = _KeyedLocks()
        self.not_ready_reason = _lacks_net_admin()

    async def handle(self, command: str, http_request: web.Request) -> web.Response:
        version = DEFAULT_VERSION
        subject: dict[str, str] = {}
        try:
            envelope = await _read_envelope(http_request)
            config = envelope.get("config")
            if isinstance(config, dict) and isinstance(config.get("cniVersion"), str):
                version = config["cniVersion"]
            request = parse_request(command, envelope)
            subject = {"capsule": request.pod_name or "", "container": request.container_id}
            if command == "ADD":
                return web.json_response(await self._add(request))
            if command == "DEL":
                await self._delete(request)
            else:
                await self._check(request)
            return web.Response()
        except CniError as exc:
            log.warning(f"CNI {command} failed", code=int(exc.code), error=exc.msg, **subject)
            return _error_response(exc, version)
        except Exception as exc:
            log.exception(f"CNI {command} failed unexpectedly", **subject)
            error = CniError(ErrorCode.INTERNAL, f"capsa-cni-daemon failed: {exc}", repr(exc))
            return _error_response(error, version)

    async def _add(self, request: CniRequest) -> dict[str, Any]:
        pod = _pod_name(request)
        async with self._pod_locks.hold(pod):
            port = await self._port_of(pod)
            if port is None:
                raise CniError(
                    ErrorCode.UNKNOWN_CONTAINER,
                    f"capsule {pod} has no port: the compute agent allocates a capsule's port "
                    "before it runs the sandbox",
                    "K8S_POD_NAME must be the uuid of a capsule scheduled on this host; a sandbox "
                    "created outside capsa gets no network",
                )
            plugged = await self._netlink(
                request,
                self._dataplane.plug,
                request.container_id,
                request.netns,
                request.ifname,
                port,
            )
            try:
                result = build_result(
                    request.cni_version, plugged, request.dns, request.prev_result
                )
                await self._record(
                    "recording the binding of",
                    self._ports.port_bound(
                        port.port_id, request.container_id, plugged.host_end.name
                    ),
                )
            except BaseException:
                await self._undo_plug(request)
                raise
        log.info(
            "port bound",
            capsule=pod,
            container=request.container_id,
            port=port.port_id,
            ip=str(port.ip),
            veth=plugged.host_end.name,
            bridge=port.bridge,
            netns=request.netns,
        )
        return result

    async def _delete(self, request: CniRequest) -> None:
        pod = request.pod_name
        async with self._pod_locks.hold(pod or request.container_id):
            bridge = await self._netlink(
                request, self._dataplane.unplug, request.container_id, request.ifname
            )
            port = await self._port_of(pod) if pod else None
            if port is not None:
                await self._record(
                    "forgetting the binding of",
                    self._ports.port_unbound(port.port_id, request.container_id),
                )
            if bridge is not None:
                await self._remove_bridge_if_unused(request, bridge)
        log.info(
            "port unplugged" if bridge is not None else "nothing to unplug",
            capsule=pod or "",
            container=request.container_id,
            port=port.port_id if port else "",
        )

    async def _check(self, request: CniRequest) -> None:
        pod = _pod_name(request)
        async with self._pod_locks.hold(pod):
            port = await self._port_of(pod)
            if port is None:
                raise CniError(ErrorCode.UNKNOWN_CONTAINER, f"capsule {pod} has no port")
            await self._netlink(
                request,
                self._dataplane.check,
                request.container_id,
                request.netns,
                request.ifname,
                port,
            )

    async def _undo_plug(self, request: CniRequest) -> None:
        # The caller re-raises the failure that made this necessary; this one is only logged.
        try:
            await self._netlink(
                request, self._dataplane.unplug, request.container_id, request.ifname
            )
        except CniError as exc:
            log.warning(
                "cannot unplug after a failed ADD", container=request.container_id, error=exc.msg
            )

    async def _remove_bridge_if_unused(self, request: CniRequest, bridge: str) -> None:
        # The pod is unplugged already: an unused bridge left behind does not fail the DEL.
        try:
            await self._netlink(request, self._dataplane.remove_bridge_if_unused, bridge)
        except CniError as exc:
            log.warning("cannot remove an unused bridge", bridge=bridge, error=exc.msg)

    async def _port_of(self, pod: str) -> PortBinding | None:
        return await self._record("looking up the port of", self._ports.find_port(pod))

    async def _record(self, doing: str, call: Awaitable[T]) -> T:
        """Awaits a PortSource call; its failures are transient for the runtime."""
        try:
            return await call
        except Exception as exc:
            raise CniError(
                ErrorCode.TRY_AGAIN_LATER,
                f"capsa's port store failed {doing} the capsule: {exc}",
                repr(exc),
            ) from exc

    async def _netlink(self, request: CniRequest, fn: Callable[..., T], *args: Any) -> T:
        """Runs a data plane call on the daemon's threads; its errors become CNI errors."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args))
        except NetnsNotFound as exc:
            raise CniError(ErrorCode.INVALID_ENVIRONMENT, f"CNI_NETNS: {exc}") from exc
        except InterfaceExists as exc:
            raise CniError(ErrorCode.INVALID_ENVIRONMENT, f"CNI_IFNAME: {exc}") from exc
        except DataplaneError as exc:
            raise CniError(
                ErrorCode.INTERNAL, f"{request.command} of {request.container_id}: {exc}"
            ) from exc

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(self, _: web.Request) -> web.Response:
        if self.not_ready_reason:
            return web.json_response(
                {"status": "not ready", "reason": self.not_ready_reason}, status=503
            )
        return web.json_response({"status": "ready"})


def _pod_name(request: CniRequest) -> str:
    if not request.pod_name:
        raise CniError(
            ErrorCode.INVALID_ENVIRONMENT,
            "CNI_ARGS has no K8S_POD_NAME: capsa finds a sandbox's port by its pod name",
        )
    return request.pod_name


async def _read_envelope(http_request: web.Request) -> dict[str, Any]:
    try:
        envelope = json.loads(await http_request.read())
    except ValueError as exc:
        raise CniError(ErrorCode.DECODING_FAILURE, f"the request is not valid JSON: {exc}") from exc
    if not isinstance(envelope, dict):
        raise CniError(ErrorCode.DECODING_FAILURE, "the request must be a JSON object")
    return envelope


def _error_response(error: CniError, version: str) -> web.Response:
    return web.json_response(error.to_dict(version), status=_HTTP_STATUS.get(error.code, 400))


def _lacks_net_admin() -> str:
    """Why this process cannot bind ports, or "" when it can."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError as exc:
        return f"cannot read the process's capabilities: {exc}"
    for line in status.splitlines():
        if line.startswith("CapEff:") and int(line.split()[1], 16) & (1 << _CAP_NET_ADMIN):
            return ""
    return "the daemon lacks CAP_NET_ADMIN: run capsa as root"


def create_app(
    ports: PortSource, dataplane: Dataplane | None = None, *, workers: int = DEFAULT_WORKERS
) -> web.Application:
    """The daemon's HTTP app; its netlink thread pool ends with the app's cleanup."""
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="capsa-cni-netlink")
    service = _CniService(ports, dataplane or Dataplane(), executor)
    app = web.Application()
    for command in ("ADD", "DEL", "CHECK"):
        app.router.add_post(f"/cni/{command.lower()}", functools.partial(service.handle, command))
    app.router.add_get("/healthz", service.healthz)
    app.router.add_get("/readyz", service.readyz)

    async def stop_executor(_: web.Application) -> None:
        await asyncio.to_thread(executor.shutdown)

    app.on_cleanup.append(stop_executor)
    return app


def parse_listen(listen: str) -> tuple[str, int] | Path:
    """``cni.daemon_listen`` as (host, port) on loopback, or a unix socket path.

    Whoever reaches the daemon can plug and unplug pods' interfaces, so it never listens beyond
    the host.
    """
    if listen.startswith("unix:"):
        path = Path(listen[len("unix:") :])
        if not path.is_absolute():
            raise ValueError(f"cni.daemon_listen {listen!r}: the unix socket path must be absolute")
        return path
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not sep or not port.isdigit() or int(port) > 65535 or not loopback:
        raise ValueError(
            f"cni.daemon_listen {listen!r} must be a loopback HOST:PORT (e.g. 127.0.0.1:9519) or "
            "unix:/path: whoever reaches the daemon can rewire pods' networks"
        )
    return host, int(port)


class CniDaemon:
    """The daemon's HTTP server on loopback TCP or a unix socket, run inside ``capsa up``."""

    def __init__(
        self,
        ports: PortSource,
        listen: str,
        *,
        dataplane: Dataplane | None = None,
        workers: int = DEFAULT_WORKERS,
    ) -> None:
        self._listen = parse_listen(listen)
        self._app = create_app(ports, dataplane, workers=workers)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        runner = web.AppRunner(self._app, access_log=None)
        await runner.setup()
        try:
            site: web.BaseSite
            if isinstance(self._listen, Path):
                self._listen.parent.mkdir(parents=True, exist_ok=True)
                # A socket left by a daemon that did not stop cleanly.
                if self._listen.is_socket():
                    self._listen.unlink()
                site = web.UnixSite(runner, str(self._listen))
                await site.start()
                self._listen.chmod(0o600)
            else:
                site = web.TCPSite(runner, *self._listen)
                await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("CNI daemon listening", address=self.address)

    @property
    def address(self) -> str:
        """Where the daemon listens, as the conflist's ``daemon`` names it (port 0 resolved)."""
        if isinstance(self._listen, Path):
            return f"unix:{self._listen}"
        if self._runner is None or not self._runner.addresses:
            host, port = self._listen
        else:
            host, port = self._runner.addresses[0][:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def stop(self) -> None:
        if self._runner is None:
            return
        await self._runner.cleanup()
        self._runner = None
        if isinstance(self._listen, Path):
            self._listen.unlink(missing_ok=True)
        log.info("CNI daemon stopped")
