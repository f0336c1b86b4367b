from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from capsa.runtime.process import ManagedProcess, ProcessError, run_command, start_time

MakeProcess = Callable[..., ManagedProcess]


@pytest.fixture
async def make_process(tmp_path: Path) -> AsyncIterator[MakeProcess]:
    """ManagedProcess objects on throwaway programs; whatever they started is killed afterwards."""
    made: list[ManagedProcess] = []

    def make(
        *argv: str, name: str = "proc", environment: dict[str, str] | None = None
    ) -> ManagedProcess:
        proc = ManagedProcess(
            name, list(argv), tmp_path / f"{name}.pid", tmp_path / f"{name}.log", environment
        )
        made.append(proc)
        return proc

    yield make
    for proc in made:
        await proc.stop(timeout=1)


async def test_start_writes_pidfile_and_stop_ends_the_process(make_process: MakeProcess) -> None:
    proc = make_process("sleep", "30")
    assert not proc.is_running()
    await proc.start()
    pid = proc.pid
    assert pid is not None and proc.is_running()
    assert proc.pidfile.read_text().strip() == str(pid)
    await proc.stop(timeout=5)
    assert not proc.is_running()
    assert not proc.pidfile.exists()
    assert start_time(pid) is None


async def test_runs_with_its_own_environment_on_top_of_capsas(
    make_process: MakeProcess,
) -> None:
    proc = make_process("sleep", "30", environment={"GOGC": "50"})
    await proc.start()
    pid = proc.pid
    # Running our program, so past exec: its environment is the one it was started with.
    assert pid is not None
    environment = dict(
        entry.split(b"=", 1)
        for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if entry
    )
    assert environment[b"GOGC"] == b"50"
    assert environment[b"HOME"] == os.environ["HOME"].encode()


async def test_runs_in_its_own_session(make_process: MakeProcess) -> None:
    proc = make_process("sleep", "30")
    await proc.start()
    assert proc.pid is not None
    assert os.getsid(proc.pid) == proc.pid != os.getsid(0)


async def test_another_instance_adopts_and_stops_it(make_process: MakeProcess) -> None:
    first = make_process("sleep", "30")
    await first.start()
    pid = first.pid
    assert pid is not None
    # A later capsa: same command line and pid file, but the process is not its child.
    second = ManagedProcess("proc", ["sleep", "30"], first.pidfile, first.logfile)
    assert second.pid == pid
    await second.stop(timeout=5)
    assert not first.is_running()


async def test_recycled_pid_is_not_adopted(make_process: MakeProcess, tmp_path: Path) -> None:
    proc = make_process("sleep", "30")
    # The pid of a live process running something else (this test runner).
    proc.pidfile.write_text(f"{os.getpid()}\n")
    assert not proc.is_running()
    other = make_process("sleep", "31", name="other")
    await other.start()
    # Same program, other arguments: not ours either.
    proc.pidfile.write_text(f"{other.pid}\n")
    assert not proc.is_running()


async def test_garbage_pidfile_means_not_running(make_process: MakeProcess) -> None:
    proc = make_process("sleep", "30")
    proc.pidfile.write_text("not a pid")
    assert not proc.is_running()


async def test_stop_kills_a_process_that_ignores_sigterm(make_process: MakeProcess) -> None:
    proc = make_process("sh", "-c", "trap '' TERM; echo trapped; sleep 30 & wait")
    await proc.start()

    async def trap_installed() -> bool:
        return "trapped" in proc.log_tail()

    await proc.wait_until_ready(trap_installed, timeout=5)
    pid = proc.pid
    assert pid is not None
    await proc.stop(timeout=0.3)
    assert start_time(pid) is None
    assert not proc.pidfile.exists()


async def test_stop_when_not_running_is_a_no_op(make_process: MakeProcess) -> None:
    proc = make_process("sleep", "30")
    await proc.stop(timeout=1)
    assert not proc.is_running()


async def test_start_refuses_a_second_copy(make_process: MakeProcess) -> None:
    proc = make_process("sleep", "30")
    await proc.start()
    with pytest.raises(ProcessError, match="already running"):
        await proc.start()


async def test_early_exit_fails_with_the_log_tail(make_process: MakeProcess) -> None:
    proc = make_process("sh", "-c", "echo bind: address already in use >&2; exit 3")
    # What an earlier run wrote to the same log file is not this run's story.
    proc.logfile.write_text("old-run\n")
    await proc.start()

    async def never() -> bool:
        return False

    with pytest.raises(ProcessError, match="exited before it was ready") as err:
        await proc.wait_until_ready(never, timeout=5)
    assert "address already in use" in str(err.value)
    assert "old-run" not in str(err.value)


async def test_not_ready_in_time_fails_with_the_log_tail(make_process: MakeProcess) -> None:
    proc = make_process("sh", "-c", "echo still loading; sleep 30")
    await proc.start()

    async def never() -> bool:
        return False

    with pytest.raises(ProcessError, match=r"not ready after 0\.2s") as err:
        await proc.wait_until_ready(never, timeout=0.2)
    assert "still loading" in str(err.value)


async def test_missing_program_fails_clearly(make_process: MakeProcess) -> None:
    proc = make_process("/nonexistent/capsa-daemon", "--config", "x")
    with pytest.raises(ProcessError, match="cannot start proc"):
        await proc.start()


async def test_run_command_returns_stdout() -> None:
    assert await run_command(["sh", "-c", "echo hi"], timeout=5) == "hi\n"


async def test_run_command_failure_carries_stderr() -> None:
    with pytest.raises(ProcessError, match=r"exit 4.*disk on fire"):
        await run_command(["sh", "-c", "echo disk on fire >&2; exit 4"], timeout=5)


async def test_run_command_timeout_kills_the_command(tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    with pytest.raises(ProcessError, match=r"did not finish within 0\.2s"):
        await run_command(["sh", "-c", f"echo $$ > {marker}; exec sleep 30"], timeout=0.2)
    assert start_time(int(marker.read_text())) is None
