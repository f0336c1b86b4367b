"""capsa-cni-daemon: binds capsules' ports into pod netns when a runtime asks through capsa-cni.

``capsa-cni`` forwards each CNI call as ``POST /cni/<command>`` (add, del, check, gc, status; see
:mod:`capsa.cni.protocol` for the request).

- ADD finds the capsule's ports by the sandbox name (``K8S_POD_NAME`` in CNI_ARGS, the capsule's
  uuid), one per network it joins, plugs them all with the data plane (the first as CNI_IFNAME
  with the default route, the others as eth1, eth2...: :func:`pod_ifnames`), answers one CNI
  result with every interface and address, and then records the bindings, the pod's lock held
  until they are (a daemon that stops first, or is killed, records them from the veths' tags when
  it starts again: ``record_tagged_bindings``). If a port is still bound to an
  older sandbox that is still plugged, that sandbox is being replaced: its attachment is removed
  as the new one is made (not if the ADD fails its checks), so that the port's address and MAC
  are never on the bridge twice. ADD is idempotent for one (container id, ifname) and completes
  what a killed ADD left.
- DEL undoes an ADD, every interface of it, and is always safe: repeated, without netns or
  prevResult, for a sandbox never seen, or for an old sandbox of a capsule that has a new one (the
  host veths' names derive from the container id, and the store forgets a binding only for the
  container id that holds it). It answers once the pod is off the networks (its veths' bridge
  ports locked: they pass no frame either way) and the bindings forgotten (one store round
  trip, by the pod's name, after the detach). The veths themselves go a second after the answer
  (:data:`DETACHED_VETH_WAIT_S`), unless their netns, which the runtime deletes right after the
  DEL, took them first: the kernel's deletion of a veth would be most of a DEL's time otherwise,
  or run beside its caller's next steps. A bridge no pod is left on goes ``cni.bridge_linger``
  seconds later if no pod came back to it meanwhile. A daemon that starts retires likewise the
  unused bridges it keeps (:func:`capsa.cni.protocol.bridge_keeper`), which an earlier run
  killed within their linger left.
  Only calls on those veths deal with that deletion: an ADD of the same attachment (CNI allows
  ADD after DEL) takes them back while it waits to begin (the ADD then unlocks them) and waits
  for it once begun, and a DEL repeated meanwhile (kubelet-style runtimes send two per sandbox)
  answers at once, its work done.
- CHECK compares ``prevResult``, the port and the kernel.
- GC (CNI 1.1.0) removes this daemon's attachments that are not in ``cni.dev/valid-attachments``.
- STATUS (CNI 1.1.0) says whether the daemon can serve ADD.

``GET /healthz`` says the daemon is alive, ``GET /readyz`` that it can bind ports, ``GET /metrics``
serves call counts, errors by code and latencies in Prometheus' text format, the calls' and their
steps' (the store's and the kernel's parts).

Run it next to the API and the agent::

    daemon = CniDaemon(ports, cfg.cni_daemon_address)
    await daemon.start()
    ...
    await daemon.stop()

The daemon serves its calls on threads of its own (:mod:`capsa.cni.server`), not on the event
loop that ``capsa up`` shares with the API, the scheduler and the agents: the thread that accepts a
call does all of its work (the store's statements, netlink) and answers it. Calls for one capsule
are serialised (what a DEL deletes after its answer is not one of them); calls for different
capsules run side by side, up to ``workers`` at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from capsa.cni import metrics
from capsa.cni.protocol import (
    ATTACHMENT_COMMANDS,
    COMMANDS,
    DEFAULT_VERSION,
    ENVIRONMENT_HEADERS,
    CniError,
    CniRequest,
    ErrorCode,
    attachment_owner,
    bridge_keeper,
    build_result,
    decode_header,
    parse_config,
    parse_request,
    prev_result_problems,
)
from capsa.cni.server import HttpRequest, HttpResponse, ThreadedHttpServer
from capsa.log import get_logger
from capsa.network.dataplane import (
    Attachment,
    AttachmentTag,
    Dataplane,
    DataplaneError,
    InterfaceExists,
    NetnsNotFound,
    host_ifname,
    pod_ifnames,
)
from capsa.network.enforcement import FirewallProgress
from capsa.network.types import PluggedPort, PortBinding, PortSource
from capsa.store import notify

log = get_logger(__name__)

T = TypeVar("T")

# The most calls served at once: a call holds its thread while it waits (an ADD for the
# firewall, up to READY_WAIT_S); more wait for a thread in the listen backlog.
DEFAULT_WORKERS = 32
# The longest request head the daemon reads: a CNI variable, percent-encoded, may be far longer
# than HTTP servers' usual 8 KiB.
_MAX_HEAD = 1 << 20
# How long an ADD waits for its capsule's ports to be allocated and enforced by the firewall (the
# compute agent asks for the sandbox meanwhile), and how often it looks again between passes.
READY_WAIT_S = 10.0
_READY_RECHECK_S = 0.1
# How long the veths a DEL detached wait before it deletes them: the runtime deletes the pod's
# netns right after the DEL, which takes them with it (and the kernel's deletion of a veth, 15-20
# ms of its work and its grace periods, would otherwise run beside the DEL's caller).
DETACHED_VETH_WAIT_S = 1.0
# How long an ADD's record of its bindings waits before it tries again when the store failed
# it, doubling up to the most.
_RECORD_RETRY_FIRST_S = 0.1
_RECORD_RETRY_MAX_S = 5.0
# Bit of CAP_NET_ADMIN in /proc/self/status CapEff.
_CAP_NET_ADMIN = 12
# The steps that a call takes after its answer (command, step): not part of its duration.
STEPS_AFTER_ANSWER = frozenset({("ADD", "record")})
# Seconds: a call's steps take tenths of a millisecond when all is well.
_STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0, 10.0)
_HTTP_STATUS = {
    ErrorCode.UNKNOWN_CONTAINER: 404,
    ErrorCode.TRY_AGAIN_LATER: 503,
    ErrorCode.PLUGIN_NOT_AVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}
# Fields that name a call's subject in its log lines: capsule, container, port.
LogFields = dict[str, str]
# What a call leaves to do once its answer is out, if anything (see HttpResponse.after).
AfterAnswer = Callable[[], None] | None


class _KeyedLocks:
    """One lock per key, forgotten when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, threading.Lock] = {}
        self._users: dict[str, int] = {}
        self._guard = threading.Lock()

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        release = self.acquire(key)
        try:
            yield
        finally:
            release()

    def acquire(self, key: str) -> Callable[[], None]:
        """Takes the key's lock, for as long as the caller wants; returns what releases it."""
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
            self._users[key] = self._users.get(key, 0) + 1
        lock.acquire()

        def release() -> None:
            lock.release()
            with self._guard:
                self._users[key] -= 1
                if not self._users[key]:
                    del self._users[key], self._locks[key]

        return release


@dataclasses.dataclass(eq=False)
class _Deletion:
    """Veths a DEL detached, deleted a while after its answer (DETACHED_VETH_WAIT_S) unless a
    call on them takes them back first. The state changes under the service's guard."""

    host_names: list[str]
    done: threading.Event
    # Whether that DEL forgot every binding of its attachment: a DEL repeated meanwhile has
    # nothing left to do.
    unbound_all: bool
    # The deletion has begun: a call on the veths waits for it to end.
    begun: bool = False
    # A call on the veths took them back before it began: it deletes nothing.
    taken_back: bool = False


class DaemonMetrics:
    """The daemon's series (see GET /metrics)."""

    def __init__(self) -> None:
        self.registry = metrics.Registry()
        self.requests = self.registry.counter(
            "capsa_cni_requests_total", "CNI calls served, by command.", ("command",)
        )
        self.errors = self.registry.counter(
            "capsa_cni_errors_total",
            "CNI calls that failed, by command and CNI error code.",
            ("command", "code"),
        )
        self.duration = self.registry.histogram(
            "capsa_cni_request_duration_seconds",
            "Time the daemon took to serve a CNI call, by command.",
            ("command",),
        )
        self.in_flight = self.registry.gauge(
            "capsa_cni_requests_in_flight", "CNI calls being served, by command.", ("command",)
        )
        self.steps = self.registry.histogram(
            "capsa_cni_step_duration_seconds",
            "Time of a CNI call's steps, by command and step: ADD's lookup of the ports, its "
            "wait for the firewall to enforce their rules (only when it waited), its plug (the "
            "kernel) and, after its answer, the record of their bindings (capsa's store); DEL's "
            "detach (the kernel) and unbind (the store).",
            ("command", "step"),
            _STEP_BUCKETS,
        )
        self.stale_removed = self.registry.counter(
            "capsa_cni_stale_attachments_removed_total",
            "Attachments removed that no DEL asked for: an old sandbox replaced by a capsule's "
            "new one, or one missing from a GC's valid attachments.",
            ("reason",),
        )
        self.unrecorded = self.registry.gauge(
            "capsa_cni_adds_unrecorded",
            "ADDs answered whose bindings capsa's store has not taken yet: they are retried "
            "until it does, so one that stays means the store fails.",
        )
        self.record_failures = self.registry.counter(
            "capsa_cni_record_failures_total",
            "Attempts to record an ADD's bindings after its answer that capsa's store refused.",
        )
        self.unrecorded.add(0)
        self.record_failures.inc(0)
        for command in COMMANDS:
            self.requests.inc(0, command=command)
            self.in_flight.add(0, command=command)

    def observe(self, command: str, seconds: float, error: CniError | None) -> None:
        self.requests.inc(command=command)
        self.duration.observe(seconds, command=command)
        if error is not None:
            self.errors.inc(command=command, code=str(int(error.code)))

    def observe_steps(self, command: str, steps: list[tuple[str, float]]) -> None:
        for step, seconds in steps:
            self.steps.observe(seconds, command=command, step=step)


class _CniService:
    """The CNI calls, each served on the thread that accepted it (which it blocks)."""

    def __init__(
        self,
        ports: PortSource,
        dataplane: Dataplane,
        progress: FirewallProgress | None = None,
        ready_wait: float = READY_WAIT_S,
        bridge_linger: float = 0.0,
        address: str = "",
        detached_veth_wait: float = DETACHED_VETH_WAIT_S,
    ):
        # Where capsa-cni reaches this daemon: it names the daemon's attachments' owner and its
        # bridges' keeper (CniDaemon sets it once it listens).
        self.address = address
        self._ports = ports
        self._dataplane = dataplane
        self._progress = progress
        self._ready_wait = ready_wait
        self._bridge_linger = bridge_linger
        self._detached_veth_wait = detached_veth_wait
        self._guard = threading.Lock()
        # The event loop that times bridges' lingers (CniDaemon.start sets it): a timer thread
        # per DEL would cost a thread's start each time.
        self.loop: asyncio.AbstractEventLoop | None = None
        # On the loop: the bridges their last pod left, each with its timer, removed when the
        # linger ends if still unused; the DELs' deletions of veths, each with its timer; and
        # the removals under way.
        self._idle_bridges: dict[str, asyncio.TimerHandle] = {}
        self._waiting_deletions: dict[
            _Deletion, tuple[asyncio.TimerHandle, Callable[[], None]]
        ] = {}
        self._removals: set[asyncio.Future[None]] = set()
        self._pod_locks = _KeyedLocks()
        # Host ends that a DEL detached and deletes after its answer, by name.
        self._deleting: dict[str, _Deletion] = {}
        self.metrics = DaemonMetrics()
        # The steps of the call that a thread serves, each with its seconds (see _took).
        self._call_steps = threading.local()
        self.not_ready_reason = _lacks_net_admin()
        # Set as the daemon stops: an ADD waiting for the firewall gives up, rather than hold
        # the stop for up to its whole wait.
        self.stopping = threading.Event()
        self._commands: dict[
            str, Callable[[CniRequest, LogFields], tuple[bytes | None, AfterAnswer]]
        ] = {
            "DEL": self._delete,
            "CHECK": self._check,
            "GC": self._gc,
            "STATUS": self._status,
        }

    def handle(self, command: str, http_request: HttpRequest) -> HttpResponse:
        started = time.perf_counter()
        self.metrics.in_flight.add(1, command=command)
        version = DEFAULT_VERSION
        fields: LogFields = {}
        error: CniError | None = None
        steps: list[tuple[str, float]] = []
        self._call_steps.timed = steps
        steps_after_answer = False
        try:
            config = parse_config(http_request.body)
            if isinstance(config.get("cniVersion"), str):
                version = config["cniVersion"]
            request = parse_request(command, _environment(http_request), config)
            if command in ATTACHMENT_COMMANDS:
                fields.update(capsule=request.pod_name or "", container=request.container_id)
            else:
                fields.update(network=request.network_name)
            body: bytes | None
            if command == "ADD":
                body, after = self._add(request, fields, http_request.client_gone)
            else:
                body, after = self._commands[command](request, fields)
            # Observed once the answer is out, with the call's other work after it.
            steps_after_answer = True
            observe = functools.partial(self.metrics.observe_steps, command, steps)
            return HttpResponse(200, body or b"", after=_in_turn(after, observe))
        except CniError as exc:
            error = exc
            log.warning(f"CNI {command} failed", code=int(exc.code), error=exc.msg, **fields)
            return _error_response(exc, version)
        except Exception as exc:
            log.exception(f"CNI {command} failed unexpectedly", **fields)
            error = CniError(ErrorCode.INTERNAL, f"capsa-cni-daemon failed: {exc}", repr(exc))
            return _error_response(error, version)
        finally:
            self._call_steps.timed = None
            self.metrics.in_flight.add(-1, command=command)
            self.metrics.observe(command, time.perf_counter() - started, error)
            if not steps_after_answer:
                self.metrics.observe_steps(command, steps)

    def _timed(self, step: str, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)``, its time counted as a step of the call that this thread serves."""
        started = time.perf_counter()
        try:
            return call(*args)
        finally:
            self._took(step, started)

    def _took(self, step: str, started: float) -> None:
        """Counts the time since ``started`` (time.perf_counter) as a step of the call that
        this thread serves."""
        steps = getattr(self._call_steps, "timed", None)
        if steps is not None:
            steps.append((step, time.perf_counter() - started))

    def _add(
        self, request: CniRequest, fields: LogFields, client_gone: Callable[[], bool]
    ) -> tuple[bytes, AfterAnswer]:
        pod = _pod_name(request)
        deadline: float | None = None
        waited_from: float | None = None
        while True:
            # Read before the ports: a pass applied during the read is not waited for again.
            passes = self._progress.passes if self._progress is not None else 0
            release = self._pod_locks.acquire(pod)
            try:
                ports = self._timed("lookup", self._ports_of, pod)
                waiting_for = self._unready(ports)
                if waiting_for is None:
                    if waited_from is not None:
                        self._took("wait", waited_from)
                    body, record = self._plug(request, pod, ports, fields)
                    # The pod's lock is held until the bindings are recorded, after the answer:
                    # the pod's next call finds them there.
                    return body, functools.partial(_holding, release, record)
            except BaseException:
                release()
                raise
            release()
            # Outside the pod's lock: a DEL of the sandbox (containerd gave up) goes ahead.
            assert self._progress is not None
            now = time.monotonic()
            if deadline is None:
                deadline = now + self._ready_wait
                waited_from = time.perf_counter()
                log.info(f"ADD waits for {waiting_for}", **fields)
            if self.stopping.is_set():
                raise CniError(
                    ErrorCode.TRY_AGAIN_LATER,
                    f"capsa-cni-daemon is stopping while ADD waited for {waiting_for}",
                    "the runtime retries the sandbox once capsa is up again",
                )
            if now >= deadline or client_gone():
                if not ports:
                    raise _no_port(pod)
                raise CniError(
                    ErrorCode.TRY_AGAIN_LATER,
                    f"the firewall does not enforce the security group rules of capsule {pod}'s "
                    f"ports yet (waited {self._ready_wait:g}s): capsa plugs no port before its "
                    "rules are in place",
                    "the network agent's log says why its passes fail",
                )
            if ports:
                self._progress.want_pass()
            self._progress.wait_for_pass(passes, min(_READY_RECHECK_S, deadline - now))

    def _unready(self, ports: list[PortBinding]) -> str | None:
        """What the pod's ports wait for before they can be plugged; None when nothing (or when
        no network agent runs beside the daemon: a missing port then fails the ADD at once)."""
        if self._progress is None:
            return None
        if not ports:
            return "the capsule's ports to be allocated"
        if not self._progress.enforces(port.port_id for port in ports):
            return "the firewall to enforce the rules of the capsule's ports"
        return None

    def _plug(
        self, request: CniRequest, pod: str, ports: list[PortBinding], fields: LogFields
    ) -> tuple[bytes, Callable[[], None]]:
        """Plugs the pod's ports; returns the result, as the answer's body, and what records
        their bindings once it is out. The caller holds the pod's lock."""
        interfaces = _interfaces(request, pod, ports)
        fields["port"] = ",".join(port.port_id for _, port in interfaces)
        # CNI allows an ADD after a DEL of the same attachment: its veths are made again
        # once that DEL's deletion of them is over, never beside it.
        self._deleted(
            [host_ifname(request.container_id, ifname) for ifname, _ in interfaces], fields
        )
        # A capsule has one sandbox at a time: an older one that still holds a port is being
        # replaced (its DEL may come late, or never when its runtime lost it), and two veths
        # with the port's address and MAC on one bridge would make both flaky.
        plugged = self._timed(
            "plug",
            self._netlink,
            request,
            self._dataplane.plug,
            request.container_id,
            request.netns,
            interfaces,
            attachment_owner(self.address, request.network_name),
            bridge_keeper(self.address),
        )
        for (_, port), made in zip(interfaces, plugged, strict=True):
            if made.replaced:
                self.metrics.stale_removed.inc(reason="replaced_sandbox")
                log.info(
                    "unplugged the capsule's old sandbox: its new sandbox takes the port",
                    **{**fields, "port": port.port_id},
                    old_container=port.bound_container_id or "",
                    veth=made.replaced,
                )
        try:
            body = _json(
                build_result(request.cni_version, plugged, request.dns, request.prev_result)
            )
        except BaseException:
            self._undo_plug(request)
            raise
        record = functools.partial(
            self._record_bindings,
            request,
            interfaces,
            plugged,
            fields,
            getattr(self._call_steps, "timed", None),
        )
        return body, record

    def _record_bindings(
        self,
        request: CniRequest,
        interfaces: list[tuple[str, PortBinding]],
        plugged: list[PluggedPort],
        fields: LogFields,
        steps: list[tuple[str, float]] | None,
    ) -> None:
        """After an ADD's answer, with the pod's lock: records the bindings of the ports it
        plugged, again and again until the store takes them or the daemon stops (it records them
        from the veths' tags when it starts again, see record_tagged_bindings).

        The answer does not wait for the write (0.2-0.3 ms with the CPU's caches cold): what
        reads the bindings is the pod's next call, which the lock holds back until they are
        written, and the network agent's pass that adds the veth's anti-spoofing rules, which
        comes after the answer anyway.
        """
        host_ifnames = {
            port.port_id: made.host_end.name
            for (_, port), made in zip(interfaces, plugged, strict=True)
        }
        started = time.perf_counter()
        retry_in = _RECORD_RETRY_FIRST_S
        self.metrics.unrecorded.add(1)
        while True:
            try:
                self._ports.ports_bound(request.container_id, host_ifnames)
                self.metrics.unrecorded.add(-1)
                break
            except Exception as exc:
                self.metrics.record_failures.inc()
                if self.stopping.is_set():
                    log.error(
                        "the bindings of an ADD's ports are not recorded: the daemon stops; it "
                        "records them from the veths' tags when it starts again",
                        error=str(exc),
                        **fields,
                    )
                    return
                log.warning(
                    "capsa's port store failed recording the bindings of an ADD's ports; retrying",
                    error=str(exc),
                    retry_in=retry_in,
                    **fields,
                )
                self.stopping.wait(retry_in)
                retry_in = min(retry_in * 2, _RECORD_RETRY_MAX_S)
        if steps is not None:
            steps.append(("record", time.perf_counter() - started))
        # Logged once the answer is out: a line takes 0.1-0.2 ms when the CPU's caches are cold.
        _log_bound(request, interfaces, plugged, fields)

    def record_tagged_bindings(self) -> None:
        """Records the bindings that the store lacks of the veths on this host's bridges, from
        their tags (port and sandbox): those of ADDs answered by an earlier run of the daemon
        that stopped or was killed before it recorded them. Not a port that the store binds to
        another veth that is there, nor one that is not capsa's (another instance's)."""
        attached = {
            attachment.host_ifname: attachment.tag
            for attachment in self._dataplane.attachments()
            if attachment.bridge is not None and attachment.tag is not None
        }
        if not attached:
            return
        bindings = self._ports.bindings_of(sorted({tag.port_id for tag in attached.values()}))
        for host_name, tag in attached.items():
            if tag.port_id not in bindings:
                continue
            binding = bindings[tag.port_id]
            if binding == (tag.container_id, host_name):
                continue
            if binding is not None and binding[1] != host_name and binding[1] in attached:
                log.warning(
                    "two veths on this host hold a port: the store's binding names the other",
                    port=tag.port_id,
                    container=tag.container_id,
                    veth=host_name,
                    bound_veth=binding[1],
                )
                continue
            self._ports.ports_bound(tag.container_id, {tag.port_id: host_name})
            bindings[tag.port_id] = (tag.container_id, host_name)
            log.info(
                "recorded a binding from its veth's tag",
                container=tag.container_id,
                port=tag.port_id,
                veth=host_name,
            )

    def _delete(self, request: CniRequest, fields: LogFields) -> tuple[None, AfterAnswer]:
        pod = request.pod_name
        first_host_end = host_ifname(request.container_id, request.ifname)
        with self._pod_locks.hold(pod or request.container_id):
            with self._guard:
                deletion = self._deleting.get(first_host_end)
            if deletion is not None and deletion.unbound_all:
                # A repeated DEL (kubelet-style runtimes send one from StopPodSandbox, then one
                # from RemovePodSandbox): the first took the pod off the networks and forgot
                # every binding, and no ADD came since (it would have waited for this deletion).
                log.info("already unplugged: its veths are being deleted", **fields)
                return None, None
            self._deleted([first_host_end], fields)
            removed = self._timed(
                "detach",
                self._netlink,
                request,
                self._dataplane.detach,
                request.container_id,
                request.ifname,
            )
            port_ids = [a.tag.port_id for a in removed if a.tag is not None]
            # Only where this container holds the binding: a newer sandbox's stays. By the pod's
            # name, a veth without its tag (an ADD killed early), or none left, loses it too.
            # After the detach, not beside it: once the binding is gone, the network agent's
            # next pass drops the port's anti-spoofing rules, which the pod must not outlive on
            # the network.
            if pod:
                unbound = self._timed(
                    "unbind",
                    _record,
                    "forgetting the bindings of",
                    self._ports.pod_unbound,
                    pod,
                    request.container_id,
                )
                port_ids = list(dict.fromkeys([*port_ids, *unbound]))
            elif port_ids:
                self._timed(
                    "unbind",
                    _record,
                    "forgetting the bindings of",
                    self._ports.ports_unbound,
                    port_ids,
                    request.container_id,
                )
            if port_ids:
                fields["port"] = ",".join(port_ids)
            if not removed:
                return None, functools.partial(log.info, "nothing to unplug", **fields)
            # Registered before the pod's lock goes: an ADD of the same attachment that comes
            # next waits for the deletion.
            deletion = _Deletion(
                [a.host_ifname for a in removed],
                threading.Event(),
                unbound_all=bool(pod) or len(port_ids) == len(removed),
            )
            with self._guard:
                self._deleting.update(dict.fromkeys(deletion.host_names, deletion))
        bridges = list(dict.fromkeys(a.bridge for a in removed if a.bridge))
        remove = functools.partial(self._remove_detached, request, bridges, deletion, fields)
        return None, functools.partial(self._unplugged, deletion, remove, fields)

    def _unplugged(
        self, deletion: _Deletion, remove: Callable[[], None], fields: LogFields
    ) -> None:
        """After a DEL's answer: its veths' deletion, at once or after the wait."""
        log.info("port unplugged", **fields)
        if self._detached_veth_wait <= 0:
            remove()
            return
        assert self.loop is not None, "CniDaemon.start sets the loop before any call"
        self.loop.call_soon_threadsafe(self._wait_to_remove, deletion, remove)

    def _wait_to_remove(self, deletion: _Deletion, remove: Callable[[], None]) -> None:
        # On the loop.
        assert self.loop is not None
        timer = self.loop.call_later(self._detached_veth_wait, self._start_removal, deletion)
        self._waiting_deletions[deletion] = (timer, remove)

    def _start_removal(self, deletion: _Deletion) -> None:
        # On the loop.
        _, remove = self._waiting_deletions.pop(deletion)
        self._remove_in_background(remove)

    def _remove_in_background(self, remove: Callable[[], None]) -> None:
        """On the loop: runs ``remove`` on a thread, which finish_background waits for."""
        assert self.loop is not None
        removal = self.loop.run_in_executor(None, remove)
        self._removals.add(removal)
        removal.add_done_callback(self._removals.discard)

    def _remove_detached(
        self, request: CniRequest, bridges: list[str], deletion: _Deletion, fields: LogFields
    ) -> None:
        """Deletes the veths a DEL detached, if their netns did not take them meanwhile and no
        call took them back, then retires their bridges; only calls on those veths wait for it
        once begun (:meth:`_deleted`), not the pod's other calls."""
        with self._guard:
            if deletion.taken_back:
                return
            deletion.begun = True
        try:
            self._netlink(request, self._dataplane.remove_detached, deletion.host_names)
        except CniError as exc:
            # Its netns going removes it too; GC removes it if neither happened.
            log.warning("cannot remove a detached veth", error=exc.msg, **fields)
        finally:
            with self._guard:
                self._forget(deletion)
        for bridge in bridges:
            self._retire_bridge(bridge)

    def _deleted(self, host_names: list[str], fields: LogFields) -> None:
        """Makes sure no DEL deletes any of the veths ``host_names`` any more: takes them back
        from a deletion that waits to begin, waits for one under way to end."""
        under_way = []
        with self._guard:
            for deletion in {self._deleting[n] for n in host_names if n in self._deleting}:
                if deletion.begun:
                    under_way.append(deletion)
                    continue
                deletion.taken_back = True
                self._forget(deletion)
        if under_way:
            log.info("waiting for a DEL's deletion of the attachment's veths", **fields)
            for deletion in under_way:
                deletion.done.wait()

    def _forget(self, deletion: _Deletion) -> None:
        """A deletion is over, or taken back: calls on its veths no longer deal with it. The
        caller holds the guard."""
        for name in deletion.host_names:
            if self._deleting.get(name) is deletion:
                del self._deleting[name]
        deletion.done.set()

    async def finish_background(self) -> None:
        """On the event loop, once no call runs any more: deletes the veths that DELs detached
        without waiting any longer, waits for the removals of bridges whose linger ended, and
        removes those still lingering without waiting for it."""
        for deletion, (timer, _) in list(self._waiting_deletions.items()):
            timer.cancel()
            self._start_removal(deletion)
        if self._removals:
            await asyncio.gather(*self._removals)
        idle, self._idle_bridges = self._idle_bridges, {}
        for timer in idle.values():
            timer.cancel()
        for bridge in idle:
            await asyncio.to_thread(self._remove_bridge_if_unused, bridge)

    def _retire_bridge(self, bridge: str) -> None:
        """A bridge that a pod left: removed if no pod is left on it, at once or once
        ``bridge_linger`` seconds have passed (a pod that comes meanwhile finds it made, and
        keeps it), so that a capsule replacing the network's last one on this host neither
        waits for its removal nor makes it again."""
        if self._bridge_linger <= 0:
            self._remove_bridge_if_unused(bridge)
            return
        assert self.loop is not None, "CniDaemon.start sets the loop before any call"
        self.loop.call_soon_threadsafe(self._linger, bridge)

    def _linger(self, bridge: str) -> None:
        # On the loop.
        assert self.loop is not None
        timer = self._idle_bridges.pop(bridge, None)
        if timer is not None:
            timer.cancel()
        self._idle_bridges[bridge] = self.loop.call_later(
            self._bridge_linger, self._linger_ended, bridge
        )

    def _linger_ended(self, bridge: str) -> None:
        # On the loop.
        self._idle_bridges.pop(bridge, None)
        self._remove_in_background(functools.partial(self._remove_bridge_if_unused, bridge))

    def retire_idle_bridges(self, keeper: str) -> None:
        """Retires the bridges of ``keeper`` that no pod uses: an earlier run of this daemon,
        stopped before their linger ended (killed), left them."""
        try:
            idle = self._dataplane.idle_bridges(keeper)
        except (DataplaneError, OSError) as exc:
            log.warning("cannot look for unused bridges", error=str(exc))
            return
        for bridge in idle:
            log.info("bridge found unused at start", bridge=bridge)
            self._retire_bridge(bridge)

    def _check(self, request: CniRequest, fields: LogFields) -> tuple[None, AfterAnswer]:
        pod = _pod_name(request)
        prev_result = request.prev_result
        if prev_result is None:
            raise CniError(
                ErrorCode.INVALID_NETWORK_CONFIG,
                "CHECK needs prevResult: the runtime passes the result of the attachment's ADD",
            )
        with self._pod_locks.hold(pod):
            interfaces = _interfaces(request, pod, self._ports_of(pod))
            fields["port"] = ",".join(port.port_id for _, port in interfaces)
            problems = [
                problem
                for ifname, port in interfaces
                for problem in prev_result_problems(prev_result, request.netns, ifname, port)
            ]
            if problems:
                raise CniError(
                    ErrorCode.INTERNAL,
                    f"CHECK of {request.container_id}: " + "; ".join(problems),
                )
            self._netlink(
                request, self._dataplane.check, request.container_id, request.netns, interfaces
            )
        return None, None

    def _gc(self, request: CniRequest, fields: LogFields) -> tuple[None, AfterAnswer]:
        """Removes this owner's attachments that the runtime no longer lists (every interface of
        each), with their bindings; carries on past failures and reports them all at the end."""
        valid = {
            host_ifname(cid, name)
            for cid, ifname in request.valid_attachments
            for name in pod_ifnames(ifname)
        }
        attachments = self._netlink(request, self._dataplane.attachments)
        owner = attachment_owner(self.address, request.network_name)
        stale = [
            (a, a.tag)
            for a in attachments
            if a.tag is not None and a.tag.owner == owner and a.host_ifname not in valid
        ]
        failures: list[str] = []
        bridges: set[str] = set()
        for attachment, tag in stale:
            try:
                removed = self._collect(request, attachment.host_ifname, tag)
            except CniError as exc:
                failures.append(f"{attachment.host_ifname}: {exc.msg}")
                continue
            if removed is not None and removed.bridge:
                bridges.add(removed.bridge)
        for bridge in bridges:
            self._retire_bridge(bridge)
        log.info(
            "GC done",
            **fields,
            valid=len(valid),
            removed=len(stale) - len(failures),
            failed=len(failures),
        )
        if failures:
            raise CniError(
                ErrorCode.INTERNAL,
                f"GC could not remove {len(failures)} stale attachments",
                "; ".join(failures),
            )
        return None, None

    def _collect(
        self, request: CniRequest, host_name: str, tag: AttachmentTag
    ) -> Attachment | None:
        """Removes one stale attachment and forgets its binding."""
        removed = self._netlink(request, self._dataplane.remove_attachment, host_name)
        _record(
            "forgetting the binding of",
            self._ports.ports_unbound,
            [tag.port_id],
            tag.container_id,
        )
        if removed is not None:
            self.metrics.stale_removed.inc(reason="gc")
            log.info(
                "GC removed an attachment the runtime no longer has",
                container=tag.container_id,
                port=tag.port_id,
                veth=host_name,
            )
        return removed

    def _status(self, request: CniRequest, fields: LogFields) -> tuple[None, AfterAnswer]:
        if self.not_ready_reason:
            raise CniError(
                ErrorCode.PLUGIN_NOT_AVAILABLE,
                f"capsa-cni-daemon cannot bind ports: {self.not_ready_reason}",
            )
        return None, None

    def _undo_plug(self, request: CniRequest) -> None:
        # The caller re-raises the failure that made this necessary; this one is only logged.
        try:
            self._netlink(request, self._dataplane.unplug, request.container_id, request.ifname)
        except CniError as exc:
            log.warning(
                "cannot unplug after a failed ADD", container=request.container_id, error=exc.msg
            )

    def _remove_bridge_if_unused(self, bridge: str) -> None:
        # Safe beside any ADD: the data plane checks and removes a bridge under the same lock
        # as a plug attaches to it, so a pod plugged meanwhile keeps it, or makes it again.
        # The pods are unplugged already: an unused bridge left behind fails no call.
        try:
            self._dataplane.remove_bridge_if_unused(bridge)
        except (DataplaneError, OSError) as exc:
            log.warning("cannot remove an unused bridge", bridge=bridge, error=str(exc))

    def _ports_of(self, pod: str) -> list[PortBinding]:
        return _record("looking up the ports of", self._ports.find_ports, pod)

    def _netlink(self, request: CniRequest, fn: Callable[..., T], *args: Any) -> T:
        """Runs a data plane call of ``request``; its errors become CNI errors."""
        try:
            return fn(*args)
        except NetnsNotFound as exc:
            raise CniError(ErrorCode.INVALID_ENVIRONMENT, f"CNI_NETNS: {exc}") from exc
        except InterfaceExists as exc:
            raise CniError(ErrorCode.INVALID_ENVIRONMENT, f"CNI_IFNAME: {exc}") from exc
        except DataplaneError as exc:
            subject = request.container_id or request.network_name
            raise CniError(ErrorCode.INTERNAL, f"{request.command} of {subject}: {exc}") from exc

    def healthz(self) -> HttpResponse:
        return _json_response(200, {"status": "alive"})

    def readyz(self) -> HttpResponse:
        if self.not_ready_reason:
            return _json_response(503, {"status": "not ready", "reason": self.not_ready_reason})
        return _json_response(200, {"status": "ready"})

    def metrics_page(self) -> HttpResponse:
        return HttpResponse(200, self.metrics.registry.render().encode(), metrics.CONTENT_TYPE)


def _in_turn(*works: AfterAnswer) -> Callable[[], None]:
    """Work after a call's answer: each of ``works`` that there is, in turn."""

    def run() -> None:
        for work in works:
            if work is not None:
                work()

    return run


def _holding(release: Callable[[], None], work: Callable[[], None]) -> None:
    """``work``, then ``release`` whatever came of it."""
    try:
        work()
    finally:
        release()


def _record(doing: str, call: Callable[..., T], *args: Any) -> T:
    """Runs a PortSource call; its failures are transient for the runtime."""
    try:
        return call(*args)
    except Exception as exc:
        raise CniError(
            ErrorCode.TRY_AGAIN_LATER,
            f"capsa's port store failed {doing} the capsule: {exc}",
            repr(exc),
        ) from exc


def _log_bound(
    request: CniRequest,
    interfaces: list[tuple[str, PortBinding]],
    plugged: list[PluggedPort],
    fields: LogFields,
) -> None:
    for (ifname, port), made in zip(interfaces, plugged, strict=True):
        log.info(
            "port bound",
            **{**fields, "port": port.port_id},
            ifname=ifname,
            ip=str(port.ip),
            veth=made.host_end.name,
            bridge=port.bridge,
            netns=request.netns,
        )


def _interfaces(
    request: CniRequest, pod: str, ports: list[PortBinding]
) -> list[tuple[str, PortBinding]]:
    """The pod's interfaces, named from CNI_IFNAME, each with its port."""
    if not ports:
        raise _no_port(pod)
    ifnames = pod_ifnames(request.ifname, len(ports))
    if len(ifnames) < len(ports):
        raise CniError(
            ErrorCode.INVALID_ENVIRONMENT,
            f"CNI_IFNAME {request.ifname!r}: capsule {pod} joins {len(ports)} networks, and "
            f"the names of its interfaces after {request.ifname} would pass 15 bytes",
        )
    return list(zip(ifnames, ports, strict=True))


def _no_port(pod: str) -> CniError:
    return CniError(
        ErrorCode.UNKNOWN_CONTAINER,
        f"capsule {pod} has no port: the compute agent allocates a capsule's ports as it asks "
        "for its sandbox",
        "K8S_POD_NAME must be the uuid of a capsule scheduled on this host; a sandbox "
        "created outside capsa gets no network",
    )


def _pod_name(request: CniRequest) -> str:
    if not request.pod_name:
        raise CniError(
            ErrorCode.INVALID_ENVIRONMENT,
            "CNI_ARGS has no K8S_POD_NAME: capsa finds a sandbox's port by its pod name",
        )
    return request.pod_name


def _environment(http_request: HttpRequest) -> dict[str, str]:
    """The CNI variables that capsa-cni sent as headers."""
    return {
        variable: decode_header(http_request.headers.get(header.lower(), ""))
        for variable, header in ENVIRONMENT_HEADERS.items()
    }


def _json(value: dict[str, Any]) -> bytes:
    # ASCII with escapes: a path from the runtime may hold undecodable bytes (lone surrogates,
    # which capsa-cni's decoding turns back into the bytes).
    return json.dumps(value).encode()


def _json_response(status: int, body: dict[str, Any]) -> HttpResponse:
    return HttpResponse(status, _json(body))


def _error_response(error: CniError, version: str) -> HttpResponse:
    return _json_response(_HTTP_STATUS.get(error.code, 400), error.to_dict(version))


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
    """The daemon's HTTP server on loopback TCP or a unix socket, run inside ``capsa up``.

    With ``progress`` (the host's network agent runs beside it), an ADD waits up to
    ``ready_wait`` seconds for the capsule's ports to exist and be enforced by the firewall. A
    bridge that its last pod left is removed ``bridge_linger`` seconds later if no pod came
    meanwhile (at once with 0), and when the daemon stops at the latest. The veths a DEL takes
    off the network are deleted ``detached_veth_wait`` seconds after its answer (at once with 0),
    or when the daemon stops. Up to ``workers`` calls are served at once.
    """

    def __init__(
        self,
        ports: PortSource,
        listen: str,
        *,
        dataplane: Dataplane | None = None,
        workers: int = DEFAULT_WORKERS,
        progress: FirewallProgress | None = None,
        ready_wait: float = READY_WAIT_S,
        bridge_linger: float = 0.0,
        detached_veth_wait: float = DETACHED_VETH_WAIT_S,
    ) -> None:
        self._listen = parse_listen(listen)
        self._listen_text = listen
        self._dataplane = dataplane or Dataplane()
        self.service = _CniService(
            ports,
            self._dataplane,
            progress,
            ready_wait,
            bridge_linger,
            address=listen,
            detached_veth_wait=detached_veth_wait,
        )
        self._server = ThreadedHttpServer(
            self._listen, self._route, max_threads=workers, name="capsa-cni", max_head=_MAX_HEAD
        )
        self._running = False
        self._routes: dict[tuple[str, str], Callable[[HttpRequest], HttpResponse]] = {
            ("POST", f"/cni/{command.lower()}"): functools.partial(self.service.handle, command)
            for command in COMMANDS
        }
        self._routes[("GET", "/healthz")] = lambda _: self.service.healthz()
        self._routes[("GET", "/readyz")] = lambda _: self.service.readyz()
        self._routes[("GET", "/metrics")] = lambda _: self.service.metrics_page()

    async def start(self) -> None:
        self.service.loop = asyncio.get_running_loop()
        # Before the first call: an ADD reads the bindings that this records.
        try:
            await asyncio.to_thread(self.service.record_tagged_bindings)
        except Exception:
            log.exception(
                "could not record the bindings that the veths' tags tell: a port whose ADD "
                "was answered before a crash may lack its anti-spoofing rules"
            )
        self._server.start()
        self._running = True
        # Port 0 is known now; no plugin could reach the daemon before.
        self.service.address = self.address
        log.info("CNI daemon listening", address=self.address)
        await asyncio.to_thread(self.service.retire_idle_bridges, bridge_keeper(self.address))

    @property
    def address(self) -> str:
        """Where the daemon listens, as capsa-cni's launcher names it: as configured (a host
        name stays a name), port 0 resolved once it listens."""
        if isinstance(self._listen, Path) or self._listen[1] != 0:
            return self._listen_text
        address = self._server.address
        assert not isinstance(address, Path)
        host, port = address if self._running else self._listen
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def stop(self) -> None:
        """Stops taking calls; returns once those under way, and the work they left after their
        answers, are done, and the bridges left unused are removed."""
        if not self._running:
            return
        self._running = False
        self.service.stopping.set()
        await asyncio.to_thread(self._server.stop)
        # The last calls' retirements of bridges reached the loop before the server stopped.
        await self.service.finish_background()
        self._dataplane.close()
        log.info("CNI daemon stopped")

    def _route(self, request: HttpRequest) -> HttpResponse:
        # The wake-ups of the call's writes (the network agent's) go to the event loop once
        # its answer is out: the woken loop would take the GIL from this thread before it
        # answers.
        notify.hold_wakeups()
        try:
            response = self._serve(request)
        except BaseException:
            notify.release_wakeups()
            raise
        return dataclasses.replace(response, after=_in_turn(notify.release_wakeups, response.after))

    def _serve(self, request: HttpRequest) -> HttpResponse:
        path = request.path.partition("?")[0]
        serve = self._routes.get((request.method, path))
        if serve is not None:
            return serve(request)
        if any(known == path for _, known in self._routes):
            return HttpResponse(
                405, f"{request.method} is not allowed here\n".encode(), "text/plain"
            )
        return HttpResponse(404, f"no such resource: {path}\n".encode(), "text/plain")
