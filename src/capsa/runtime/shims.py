"""Shims that containerd 1.6 lost, found and stopped.

When a RunPodSandbox is cut short while containerd starts the sandbox's task (capsa killed at that
moment closes the call), containerd drops its side of the new shim ("cleaning up after shim
disconnected") but the shim process lives on, with no task and no child, for ever. Nothing in CRI
shows it. A shim of capsa's containerd is such a leftover when its id is no sandbox that containerd
knows, it has no child process (a pod's processes are its children), and it is older than any
sandbox start could take, so that a shim of a sandbox being started right now is never touched.
Such a shim exits on SIGTERM but may leave its socket in /run/containerd/s, which goes too.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from capsa.log import get_logger
from capsa.runtime.process import start_time

log = get_logger(__name__)

_SHIM_PROGRAM = "containerd-shim"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Where containerd 1.6 puts shim sockets, whatever its own state dir (it cannot be moved).
SHIM_SOCKET_DIR = Path("/run/containerd/s")
_EXIT_WAIT_S = 2.0


@dataclass(frozen=True)
class Shim:
    pid: int
    id: str
    namespace: str
    address: str
    # When the process started, in clock ticks since boot.
    started: int

    def socket_in(self, directory: Path) -> Path:
        """The shim's socket, named as containerd 1.6 names it: a hash of address/namespace/id."""
        key = str(Path(self.address, self.namespace, self.id))
        return directory / hashlib.sha256(key.encode()).hexdigest()


def shims_of(containerd_address: str, proc: Path = Path("/proc")) -> list[Shim]:
    """The shim processes that serve the containerd listening on ``containerd_address``."""
    found = []
    for cmdline in proc.glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or _SHIM_PROGRAM not in Path(argv[0].decode(errors="replace")).name:
            continue
        args = [a.decode(errors="replace") for a in argv[1:]]
        options = dict(zip(args[::2], args[1::2], strict=False))
        if options.get("-address") != containerd_address or "-id" not in options:
            continue
        pid = int(cmdline.parent.name)
        started = start_time(pid)
        if started is not None:
            found.append(
                Shim(
                    pid=pid,
                    id=options["-id"],
                    namespace=options.get("-namespace", ""),
                    address=containerd_address,
                    started=started,
                )
            )
    return found


def has_children(pid: int) -> bool:
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            if children.read_text().strip():
                return True
        except OSError:
            continue
    return False


def lost_shims(containerd_address: str, sandbox_ids: set[str], min_age_s: float) -> list[Shim]:
    """Shims of that containerd that serve no sandbox it knows, idle and older than min_age_s."""
    now = _uptime_ticks()
    return [
        shim
        for shim in shims_of(containerd_address)
        if shim.id not in sandbox_ids
        and (now - shim.started) / _CLOCK_TICKS >= min_age_s
        and not has_children(shim.pid)
    ]


def stop_lost_shims(
    containerd_address: str,
    sandbox_ids: set[str],
    min_age_s: float,
    socket_dir: Path = SHIM_SOCKET_DIR,
) -> int:
    """Stops the lost shims (a shim exits on SIGTERM and removes its socket); how many."""
    stopped = 0
    for shim in lost_shims(containerd_address, sandbox_ids, min_age_s):
        # Checked again just before the signal: the pid must still be that very process.
        if start_time(shim.pid) != shim.started:
            continue
        log.warning("stopping a shim that containerd lost", pid=shim.pid, sandbox=shim.id)
        try:
            os.kill(shim.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + _EXIT_WAIT_S
        while start_time(shim.pid) == shim.started and time.monotonic() < deadline:
            time.sleep(0.05)
        shim.socket_in(socket_dir).unlink(missing_ok=True)
        stopped += 1
    return stopped


def _uptime_ticks() -> int:
    return int(float(Path("/proc/uptime").read_text().split()[0]) * _CLOCK_TICKS)
