"""The kernel objects and leftovers a run makes on this host, made with unique names and removed
again: network namespaces, links, subnets that collide with nothing, cgroups, mounts, shim sockets.

Other engineers run tests on this machine at the same time, so every name carries a random suffix
and every removal touches only what this run named.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import secrets
import socket
import subprocess
from pathlib import Path
from typing import Any

from capsa.runtime.shims import SHIM_SOCKET_DIR, Shim

COMMAND_TIMEOUT = 30.0
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Where containerd 1.6 (libcni) caches CNI results, whatever its own state dir.
CNI_RESULT_CACHE = Path("/var/lib/cni/results")
NETNS_DIR = Path("/run/netns")


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=check
    )


def token(size: int = 4) -> str:
    return secrets.token_hex(size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ip_json(*args: str) -> list[dict[str, Any]]:
    result = run("ip", "-j", *args, check=False)
    if result.returncode != 0:
        return []
    parsed: list[dict[str, Any]] = json.loads(result.stdout or "[]")
    return parsed


def free_subnet(prefix: int = 24) -> ipaddress.IPv4Network:
    """A random 10.x.y.0/prefix that no address or route of this host overlaps."""
    used = [
        ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False)
        for link in ip_json("-4", "addr", "show")
        for a in link.get("addr_info", [])
    ]
    used += [
        ipaddress.ip_network(r["dst"], strict=False)
        for r in ip_json("-4", "route", "show")
        if r.get("dst", "default") != "default"
    ]
    for _ in range(200):
        base = ipaddress.IPv4Address(f"10.{random.randint(64, 250)}.{random.randint(0, 255)}.0")
        subnet = ipaddress.IPv4Network(f"{base}/{prefix}", strict=False)
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise RuntimeError(f"no free 10.x.y.0/{prefix} subnet on this host")


def add_netns(name: str) -> Path:
    """A named network namespace, bind-mounted under /run/netns as containerd's are."""
    run("ip", "netns", "add", name)
    return NETNS_DIR / name


def delete_netns(name: str) -> None:
    run("ip", "netns", "del", name, check=False)


def delete_link(name: str) -> None:
    run("ip", "link", "del", name, check=False)


def link_exists(name: str) -> bool:
    return bool(ip_json("link", "show", "dev", name))


def links_with_addresses_in(subnet: ipaddress.IPv4Network) -> list[str]:
    """Links (bridges) that hold an address of ``subnet``, e.g. the gateway of a network."""
    return [
        link["ifname"]
        for link in ip_json("-4", "addr", "show")
        for a in link.get("addr_info", [])
        if ipaddress.ip_address(a["local"]) in subnet
    ]


def remove_cgroup(parent: str) -> None:
    """The cgroupfs parent runc made in every hierarchy (empty once the pods are gone)."""
    name = parent.strip("/")
    if not name:
        return
    for hierarchy in CGROUP_ROOT.iterdir():
        with contextlib.suppress(OSError):
            (hierarchy / name).rmdir()


def unmount_under(path: Path) -> None:
    """Unmounts whatever is still mounted below ``path``, deepest first."""
    prefix = f"{path}/"
    mounts = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(prefix)
    ]
    for mountpoint in sorted(mounts, key=len, reverse=True):
        run("umount", "-l", mountpoint, check=False)


def remove_cni_results(network_name: str) -> None:
    """libcni's cached results of one network (left when a DEL never ran)."""
    for cached in CNI_RESULT_CACHE.glob(f"{network_name}-*"):
        cached.unlink(missing_ok=True)


def remove_stale_shim_sockets(containerd_log: Path, cri_socket: str) -> None:
    """Sockets of shims of one containerd that died without removing them; their ids appear in
    that containerd's log, and their names hash its address (see capsa.runtime.shims)."""
    if not containerd_log.exists():
        return
    text = containerd_log.read_text(errors="replace")
    for shim_id in set(re.findall(r"\b[0-9a-f]{64}\b", text)):
        shim = Shim(pid=0, id=shim_id, namespace="k8s.io", address=cri_socket, started=0)
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


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time a process and its reaped children have used (user + system), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime, stime, cutime, cstime: fields 14 to 17 of stat(5), counted after the command name.
    return sum(int(f) for f in fields[11:15]) / _CLOCK_TICKS


def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"process {pid} reports no VmRSS (a zombie?)")
