"""One way to run the daemons capsa needs for itself (containerd, the registry, later dockerd).

A :class:`ManagedProcess` outlives the capsa that started it: it runs in its own session, so a
SIGKILL of capsa leaves it running, and the next capsa finds it through its pid file and adopts
it. A pid is adopted only when ``/proc/<pid>/cmdline`` still shows the same program and
arguments, so a recycled pid is never mistaken for ours::

    proc = ManagedProcess("registry", ["docker-registry", "serve", "/x/config.yml"],
                          pidfile=Path("/x/registry.pid"), logfile=Path("/x/registry.log"))
    if not proc.is_running():
        await proc.start()
        await proc.wait_until_ready(probe, timeout=10)
    ...
    await proc.stop(timeout=10)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from capsa.files import atomic_write
from capsa.log import get_logger
from capsa.runtime.errors import HostRuntimeError

log = get_logger(__name__)

_POLL_INTERVAL = 0.02
_EXEC_TIMEOUT = 2.0
_LOG_TAIL_LINES = 20
_LOG_TAIL_BYTES = 16384


class ProcessError(HostRuntimeError):
    """A process did not start, did not become ready, did not stop, or failed."""


async def run_command(argv: list[str], timeout: float, cwd: Path | None = None) -> str:
    """Runs a short command and returns its stdout; its stderr explains any failure."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise ProcessError(f"cannot run {argv[0]}: {exc}") from exc
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ProcessError(f"{shlex.join(argv)} did not finish within {timeout:g}s") from None
    if proc.returncode != 0:
        raise ProcessError(
            f"{shlex.join(argv)} failed (exit {proc.returncode}): "
            f"{stderr.decode(errors='replace').strip() or '(no error output)'}"
        )
    return stdout.decode(errors="replace")


class ManagedProcess:
    def __init__(
        self,
        name: str,
        argv: list[str],
        pidfile: Path,
        logfile: Path,
        environment: dict[str, str] | None = None,
    ) -> None:
        if not argv:
            raise ValueError(f"{name}: empty command line")
        self.name = name
        self.argv = argv
        # Set in the process's environment on top of capsa's own.
        self.environment = environment or {}
        self.pidfile = pidfile
        self.logfile = logfile
        # Set when this object started the process: it is our child and must be reaped by us.
        self._child: subprocess.Popen[bytes] | None = None
        # Where this run's output begins in the (appended) log file.
        self._log_offset = 0

    @property
    def pid(self) -> int | None:
        """The pid of our process when it is running, else None."""
        pid = self._read_pidfile()
        return pid if pid is not None and self._is_ours(pid) else None

    def is_running(self) -> bool:
        return self.pid is not None

    async def start(self) -> None:
        """Starts the process in its own session; its output is appended to the log file."""
        if self.is_running():
            raise ProcessError(f"{self.name} is already running (pid {self.pid})")
        child = self._child = self._spawn()
        atomic_write(self.pidfile, f"{child.pid}\n")
        # Popen returns as soon as exec begins, but /proc/<pid>/cmdline stays empty until the
        # kernel has set up the new program's arguments: wait for that, or for an early exit.
        deadline = time.monotonic() + _EXEC_TIMEOUT
        while not self._is_ours(child.pid) and child.poll() is None:
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.001)
        log.info("process started", process=self.name, pid=child.pid, log=self.logfile)

    async def wait_until_ready(
        self, probe: Callable[[], Awaitable[bool]], timeout: float, what: str = "ready"
    ) -> None:
        """Polls ``probe`` until it answers True; fails early when the process exits.

        The error names the process and carries the tail of its log, which usually says why.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_running():
                self._reap()
                raise ProcessError(
                    f"{self.name} exited before it was {what}; "
                    f"last lines of {self.logfile}:\n{self.log_tail()}"
                )
            if await probe():
                return
            if time.monotonic() >= deadline:
                raise ProcessError(
                    f"{self.name} (pid {self.pid}) was not {what} after {timeout:g}s; "
                    f"last lines of {self.logfile}:\n{self.log_tail()}"
                )
            await asyncio.sleep(_POLL_INTERVAL)

    async def stop(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; a no-op when the process is not running."""
        pid = self.pid
        started = start_time(pid) if pid is not None else None
        if pid is not None and started is not None:
            self._signal(pid, started, signal.SIGTERM)
            if not await self._wait_gone(pid, started, timeout):
                log.warning("process ignored SIGTERM, killing it", process=self.name, pid=pid)
                self._signal(pid, started, signal.SIGKILL)
                if not await self._wait_gone(pid, started, timeout):
                    raise ProcessError(f"{self.name} (pid {pid}) survived SIGKILL")
            log.info("process stopped", process=self.name, pid=pid)
        self._reap()
        self.pidfile.unlink(missing_ok=True)

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        with self.logfile.open("ab") as out:
            self._log_offset = out.tell()
            try:
                return subprocess.Popen(
                    self.argv,
                    env={**os.environ, **self.environment},
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise ProcessError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines this run wrote to the log file (or of the whole file when adopted)."""
        try:
            with self.logfile.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(self._log_offset, size - _LOG_TAIL_BYTES))
                data = f.read()
        except OSError as exc:
            return f"(cannot read {self.logfile}: {exc})"
        text = data.decode(errors="replace").rstrip("\n")
        return "\n".join(text.splitlines()[-lines:]) if text else "(empty)"

    def _read_pidfile(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def _is_ours(self, pid: int) -> bool:
        """Alive (not a zombie) and running our program with our arguments."""
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        # A zombie has an empty command line.
        cmdline = raw.decode(errors="replace").split("\0")[:-1]
        return (
            len(cmdline) == len(self.argv)
            and Path(cmdline[0]).name == Path(self.argv[0]).name
            and cmdline[1:] == self.argv[1:]
        )

    async def _wait_gone(self, pid: int, started: int, timeout: float) -> bool:
        """Waits until the process has released everything (exited, a zombie at most)."""
        deadline = time.monotonic() + timeout
        while start_time(pid) == started:
            self._reap()
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL_INTERVAL)
        return True

    @staticmethod
    def _signal(pid: int, started: int, sig: signal.Signals) -> None:
        # The start time tells our process from a later one that reuses its pid.
        if start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _reap(self) -> None:
        """Collects our own child's exit status so it does not linger as a zombie."""
        if self._child is not None and self._child.poll() is not None:
            self._child = None


def start_time(pid: int) -> int | None:
    """When a live process started (clock ticks since boot); None once it is dead or a zombie.

    A process that is exiting keeps its listening sockets until it turns into a zombie, so only
    then is it gone for a successor that binds the same address.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which may itself contain spaces and parentheses.
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X", "x") else int(fields[19])
