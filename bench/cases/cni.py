"""Case 3: capsa-cni ADD and DEL invoked directly as a runtime invokes a plugin, against the
reference bridge + host-local plugins.

Both sides run the program from capsa's CNI bin dir (capsa's installed launcher; the reference
plugins linked there) with the same environment (CNI_* as containerd sets them, CNI_PATH = that
dir), the network config on stdin as libcni writes it, and a fresh netns per pod made with
``ip netns add`` (a bind-mounted netns under /run/netns, as containerd makes them). capsa-cni talks
to the CNI daemon of the paired ``capsa up``, which finds each pod's port in capsa's database: the
benchmark has capsa make it first, through capsa's Neutron API.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import secrets
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench import host
from bench.report import CaseResult, Target, compared
from bench.suite import Paired, Session, interleave
from capsa.cni.daemon import STEPS_AFTER_ANSWER, parse_listen
from capsa.cni.install import CONFLIST_NAME, PLUGIN_TYPE
from capsa.model.network import DEVICE_OWNER_CAPSULE
from capsa.network.dataplane import host_ifname
from capsa.network.service import NetworkService
from capsa.store import Store

ADD_TARGET = Target("ratio", "<=", 1.0, "ratio <= 1.0")
DEL_TARGET = Target("ratio", "<=", 0.5, "ratio <= 0.5")
_TIMEOUT = 30.0
# A pause after each side's round. capsa's DEL answers before its veth is deleted, and the netns
# then deleted (as containerd deletes it) still holds that veth: the kernel's clean-up of both
# ran into the reference's next DEL, 32-38 ms instead of 20-22 with the pause (the DEL ratio
# 0.26-0.32 instead of 0.44-0.51; ADD within chance).
_SETTLE_S = 0.05
# The project of the capsules the other cases make through the API (the admin's, which capsa up
# bootstraps): an instance's /24 pool holds one project's default network.
_PROJECT = "admin"


class PluginError(RuntimeError):
    pass


class Plugin:
    """One CNI plugin program, run as containerd 1.6 (libcni) runs it."""

    def __init__(self, program: Path, conflist: dict[str, Any]) -> None:
        self.program = program
        (plugin,) = conflist["plugins"]
        # What libcni writes on the first plugin's stdin: its conf plus the list's name and version.
        self.conf = {**plugin, "name": conflist["name"], "cniVersion": conflist["cniVersion"]}

    def call(self, command: str, container_id: str, netns: Path, pod: str) -> float:
        """Runs the plugin once; returns how long it took, from spawn to exit."""
        args = [
            "IgnoreUnknown=1",
            "K8S_POD_NAMESPACE=bench",
            f"K8S_POD_NAME={pod}",
            f"K8S_POD_INFRA_CONTAINER_ID={container_id}",
            f"K8S_POD_UID={pod}",
        ]
        random.shuffle(args)  # containerd's order changes from call to call
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": str(netns),
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": ";".join(args),
            "CNI_PATH": str(self.program.parent),
        }
        stdin = json.dumps(self.conf).encode()
        began = time.perf_counter()
        done = subprocess.run(
            [str(self.program)], input=stdin, env=env, capture_output=True, timeout=_TIMEOUT
        )
        took = time.perf_counter() - began
        if done.returncode != 0:
            raise PluginError(
                f"{self.program.name} {command} failed ({done.returncode}): "
                f"{done.stdout.decode(errors='replace')} {done.stderr.decode(errors='replace')}"
            )
        return took


def interpreter_alone(launcher: Path) -> Callable[[], dict[str, float]]:
    """A round that runs the launcher's interpreter, with its flags, on nothing but its exit: the
    floor under any ADD or DEL of a Python plugin, since the reference's plugins start as compiled
    programs. It ends as capsa-cni does, with ``posix._exit`` (the interpreter's clean-up at exit
    is about 1 ms that no plugin has to pay)."""
    shebang = launcher.read_text().splitlines()[0].removeprefix("#!").split()
    command = [*shebang, "-c", "import posix; posix._exit(0)"]
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}

    def one_round() -> dict[str, float]:
        # Spawned as Plugin.call spawns a plugin.
        began = time.perf_counter()
        subprocess.run(
            command, input=b"", env=env, capture_output=True, check=True, timeout=_TIMEOUT
        )
        return {"start": time.perf_counter() - began}

    return one_round


class Pods:
    """Pods of one side, each in a fresh netns; ``remove_all`` DELs what is still plugged and
    removes every netns and host veth."""

    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin
        self.netns: list[str] = []
        self.container_ids: list[str] = []
        # container id -> (netns, pod) of the pods that were ADDed and not DELeted yet.
        self.plugged: dict[str, tuple[Path, str]] = {}

    def add(self, pod: str) -> tuple[str, float]:
        name = f"capsa-bench-{secrets.token_hex(5)}"
        self.netns.append(name)
        netns = host.add_netns(name)
        container_id = secrets.token_hex(32)
        self.container_ids.append(container_id)
        took = self.plugin.call("ADD", container_id, netns, pod)
        self.plugged[container_id] = (netns, pod)
        return container_id, took

    def delete(self, container_id: str) -> float:
        netns, pod = self.plugged[container_id]
        took = self.plugin.call("DEL", container_id, netns, pod)
        del self.plugged[container_id]
        host.delete_netns(netns.name)
        return took

    def remove_all(self) -> None:
        try:
            for container_id in list(self.plugged):
                with contextlib.suppress(PluginError, subprocess.SubprocessError):
                    self.delete(container_id)
        finally:
            for name in self.netns:
                if (host.NETNS_DIR / name).exists():
                    host.delete_netns(name)
            for container_id in self.container_ids:
                link = host_ifname(container_id, "eth0")
                if host.link_exists(link):
                    host.delete_link(link)


def run(session: Session) -> CaseResult:
    plan = session.plan
    paired = session.paired()
    cfg = paired.capsa.config
    capsa_pods = Pods(
        Plugin(
            cfg.cni_bin_dir / PLUGIN_TYPE,
            json.loads((cfg.cni_conf_dir / CONFLIST_NAME).read_text()),
        )
    )
    reference_pods = Pods(Plugin(cfg.cni_bin_dir / "bridge", paired.runtime.reference_conf()))
    result = CaseResult("cni", parameters={"rounds": plan.cni_rounds, "warmup": plan.warmup})
    with (
        capsa_ports(session, paired) as (new_port, release_port),
        _removing(capsa_pods, reference_pods),
    ):
        # Anchor pods keep each network's bridge, as on a host that already runs pods.
        capsa_pods.add(new_port())
        reference_pods.add(str(uuid.uuid4()))
        daemon_before = daemon_time(session, cfg.cni_daemon_address)

        def capsa_round() -> dict[str, float]:
            pod = new_port()
            container_id, added = capsa_pods.add(pod)
            deleted = capsa_pods.delete(container_id)
            # As when its capsule goes: the host keeps the anchor's port, not one per round.
            release_port(pod)
            return {"add": added, "del": deleted}

        def reference_round() -> dict[str, float]:
            container_id, added = reference_pods.add(str(uuid.uuid4()))
            return {"add": added, "del": reference_pods.delete(container_id)}

        samples = interleave(
            {
                "capsa": capsa_round,
                "reference": reference_round,
                "interpreter": interpreter_alone(capsa_pods.plugin.program),
            },
            plan.cni_rounds,
            plan.warmup,
            settle=_SETTLE_S,
        )
        daemon_after = daemon_time(session, cfg.cni_daemon_address)
    result.samples = samples
    spent = daemon_after.since(daemon_before)
    for key in ("daemon_mean_ms", "daemon_calls", "daemon_steps_mean_ms", "daemon_steps_taken"):
        result.details[key] = {}
    for command in ("ADD", "DEL"):
        if (command,) not in spent.calls:
            continue
        seconds, calls = spent.calls[(command,)]
        result.details["daemon_mean_ms"][command] = round(seconds / calls * 1000, 2)
        result.details["daemon_calls"][command] = calls
        steps = {step: spent.steps[(of, step)] for of, step in spent.steps if of == command}
        # Per call, so that a command's steps add up to (most of) its time.
        result.details["daemon_steps_mean_ms"][command] = {
            step: round(step_seconds / calls * 1000, 3) for step, (step_seconds, _) in steps.items()
        }
        # How many times each step was taken: a wait only by the ADDs that waited (which look
        # their ports up again after it).
        result.details["daemon_steps_taken"][command] = {
            step: taken for step, (_, taken) in steps.items()
        }
    result.rows = [
        compared("cni", "ADD", samples, ("capsa.add", "reference.add"), ADD_TARGET),
        compared("cni", "DEL", samples, ("capsa.del", "reference.del"), DEL_TARGET),
        compared(
            "cni",
            "floor: capsa-cni's interpreter, started and exited, against the reference's ADD",
            samples,
            ("interpreter.start", "reference.add"),
        ),
    ]
    result.notes = [
        "capsa: the installed capsa-cni launcher -> the paired capsa up's CNI daemon (unix "
        "socket) -> its database and capsa.network.netlink; reference: bridge + host-local from "
        "containernetworking-plugins, host-local's dataDir in the instance's state dir.",
        "An anchor pod stays plugged on each side throughout, so that neither ADD creates "
        "its bridge nor DEL removes it; each capsa round's port is released after its DEL, as "
        "its capsule's removal would, so the host holds two ports throughout.",
        "The floor row runs the interpreter of capsa-cni's launcher, with its flags, on nothing "
        "but an exit without clean-up, as capsa-cni ends (`-c 'import posix; posix._exit(0)'`): "
        "what any Python plugin pays, against the reference's whole ADD (two compiled "
        "programs); an ADD ratio below the floor's cannot be reached.",
        f"Each side's round is followed by a {_SETTLE_S * 1000:g} ms pause, so that the kernel's "
        "clean-up of what a round left (capsa deletes a DEL's veth after answering; the netns "
        "is deleted after the DEL) does not run into the other side's calls.",
        "Each capsa round's port is made by the paired capsa (its Neutron API, bound to its host, "
        "owned by the pod as a capsule's port) before the round's netns: its network agent "
        "enforces the port's rules before the plugin runs, as in a capsule's start.",
    ]
    return result


def daemon_time_line(details: dict[str, Any]) -> str | None:
    """The line under the table for the daemon's own time per ADD and DEL and their steps, each
    per call; a step that only some calls took (a wait) says how many took it, and those taken
    after the answer (STEPS_AFTER_ANSWER) come last, as such."""
    daemon = details.get("daemon_mean_ms")
    if not daemon:
        return None
    each = []
    for command, ms in daemon.items():
        calls = details["daemon_calls"][command]
        taken = details["daemon_steps_taken"][command]
        steps: dict[bool, list[str]] = {False: [], True: []}
        for step, step_ms in details["daemon_steps_mean_ms"][command].items():
            steps[(command, step) in STEPS_AFTER_ANSWER].append(
                f"{step} {step_ms:.2f}" + (_in_calls(taken[step]) if taken[step] < calls else "")
            )
        told = ", ".join(steps[False])
        if steps[True]:
            told += ("; " if told else "") + "after the answer: " + ", ".join(steps[True])
        each.append(f"{command} {ms:.2f} ms" + (f" ({told})" if told else ""))
    return (
        "capsa-cni-daemon's own time per call, from the request's arrival to its answer (its "
        f"duration and step metrics, mean of the case's calls): {', '.join(each)}"
    )


def _in_calls(count: int) -> str:
    return f" in {count} call" + ("" if count == 1 else "s")


_DURATION = re.compile(
    r'^capsa_cni_request_duration_seconds_(sum|count)\{command="([A-Z]+)"\} (\S+)$', re.M
)
_STEP = re.compile(
    r'^capsa_cni_step_duration_seconds_(sum|count)\{command="([A-Z]+)",step="([a-z]+)"\} (\S+)$',
    re.M,
)


# Seconds in all and times counted, by the series' label values.
Totals = dict[tuple[str, ...], tuple[float, int]]


@dataclass(frozen=True)
class DaemonTime:
    """capsa-cni-daemon's own time, from its Prometheus metrics: by (command,), its calls'
    seconds from a request's arrival to its answer, and how many; by (command, step), the
    step's seconds, and how many times it was taken."""

    calls: Totals
    steps: Totals

    def since(self, before: DaemonTime) -> DaemonTime:
        """What was spent after ``before``: the series that grew, by how much."""
        return DaemonTime(_growth(self.calls, before.calls), _growth(self.steps, before.steps))


def _growth(after: Totals, before: Totals) -> Totals:
    grown = {}
    for key, (seconds, count) in after.items():
        seconds_before, count_before = before.get(key, (0.0, 0))
        if count > count_before:
            grown[key] = (seconds - seconds_before, count - count_before)
    return grown


def daemon_time(session: Session, address: str) -> DaemonTime:
    return parse_daemon_time(session.run(_metrics_page(address)))


def parse_daemon_time(metrics_page: str) -> DaemonTime:
    return DaemonTime(_totals(_DURATION, metrics_page), _totals(_STEP, metrics_page))


def _totals(series: re.Pattern[str], text: str) -> Totals:
    """The sums and counts of a histogram's ``series`` (matching kind, label values, value)."""
    totals: dict[tuple[str, ...], list[float]] = {}
    for kind, *labels, value in series.findall(text):
        totals.setdefault(tuple(labels), [0.0, 0.0])[kind == "count"] = float(value)
    return {labels: (total, int(count)) for labels, (total, count) in totals.items()}


async def _metrics_page(address: str) -> str:
    """The daemon's /metrics at ``address`` ("unix:/path" or "HOST:PORT"), as the plugin
    addresses it."""
    listen = parse_listen(address)
    unix = isinstance(listen, Path)
    connector = aiohttp.UnixConnector(path=str(listen)) if unix else None
    timeout = aiohttp.ClientTimeout(total=_TIMEOUT)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as client,
        client.get(f"http://{'capsa' if unix else address}/metrics") as page,
    ):
        page.raise_for_status()
        return await page.text()


@contextlib.contextmanager
def capsa_ports(
    session: Session, paired: Paired
) -> Iterator[tuple[Callable[[], str], Callable[[str], None]]]:
    """Functions that give a new pod a port, and release a pod's port, as its capsule's start and
    removal do; every port still there is deleted afterwards.

    The port is made by the paired capsa through its Neutron API, bound to its host and owned by
    the pod as a capsule's port: capsa's network agent hears of it at once and enforces its
    rules before the plugin runs, as in a capsule's start, where the ADD comes 15-30 ms after the
    allocation (a port written by this process would reach that agent only when the ADD asks
    for a pass, which the ADD would then wait for). The release goes through capsa's database,
    as the capsule's removal does."""
    cfg = paired.capsa.config
    store = Store(cfg.database_url)
    session.run(store.open())
    network = NetworkService(
        store, cfg.network.default_cidr, cfg.network.mtu, cfg.network.default_prefixlen
    )
    project = session.run(store.identity.find_project(_PROJECT))
    if project is None:
        raise RuntimeError(f"capsa up did not bootstrap the project {_PROJECT!r}")
    default_network = session.run(network.project_defaults(project.id)).network.id
    api = paired.capsa.client()
    made: list[str] = []

    def new_port() -> str:
        pod = str(uuid.uuid4())
        made.append(pod)
        api.create_port(
            {
                "network_id": default_network,
                "device_id": pod,
                "device_owner": DEVICE_OWNER_CAPSULE,
                "binding:host_id": cfg.resolved_host_name,
            }
        )
        return pod

    def release_port(pod: str) -> None:
        session.run(network.release_ports(pod))
        made.remove(pod)

    try:
        yield new_port, release_port
    finally:
        try:
            for pod in made:
                session.run(network.release_ports(pod))
        finally:
            api.close()
            session.run(store.close())


@contextlib.contextmanager
def _removing(*sides: Pods) -> Iterator[None]:
    try:
        yield
    finally:
        for pods in sides:
            pods.remove_all()
