"""Lost shims are found among real processes: stand-ins that carry a shim's name and arguments."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from capsa.runtime.shims import lost_shims, shims_of, stop_lost_shims

FakeShim = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def fake_shim() -> Iterator[FakeShim]:
    """Starts a process whose command line reads like containerd-shim-runc-v2's."""
    started: list[subprocess.Popen[bytes]] = []

    def start(shim_id: str, address: str, with_child: bool = False) -> subprocess.Popen[bytes]:
        body = "import subprocess, time\n"
        if with_child:
            body += "subprocess.Popen(['sleep', '30'])\n"
        body += "time.sleep(30)\n"
        process = subprocess.Popen(
            [
                "bash",
                "-c",
                f'exec -a containerd-shim-runc-v2 "$0" -c "$1" '
                f"-namespace k8s.io -id {shim_id} -address {address}",
                sys.executable,
                body,
            ],
            start_new_session=True,
        )
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            # The whole session: a stand-in's child goes with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_shims_are_found_by_the_containerd_they_serve(fake_shim: FakeShim, tmp_path: Path) -> None:
    ours, theirs = str(tmp_path / "ours.sock"), str(tmp_path / "theirs.sock")
    mine = fake_shim("a" * 64, ours)
    fake_shim("b" * 64, theirs)

    assert _eventually(lambda: len(shims_of(ours)) == 1)
    (shim,) = shims_of(ours)
    assert (shim.pid, shim.id) == (mine.pid, "a" * 64)


def test_only_idle_old_shims_of_unknown_sandboxes_are_lost(
    fake_shim: FakeShim, tmp_path: Path
) -> None:
    address = str(tmp_path / "c.sock")
    lost = fake_shim("lost", address)
    fake_shim("known", address)
    fake_shim("busy", address, with_child=True)
    assert _eventually(lambda: len(shims_of(address)) == 3)
    time.sleep(0.3)  # let the busy one start its child

    assert [s.id for s in lost_shims(address, {"known"}, min_age_s=0)] == ["lost"]
    assert lost_shims(address, {"known"}, min_age_s=3600) == [], "a young shim may be starting"

    (lost_shim,) = lost_shims(address, {"known"}, min_age_s=0)
    left_socket = lost_shim.socket_in(tmp_path)
    left_socket.touch()

    assert stop_lost_shims(address, {"known"}, min_age_s=0, socket_dir=tmp_path) == 1
    assert lost.wait(timeout=5) is not None
    assert not left_socket.exists(), "the lost shim's socket was left behind"
    assert sorted(s.id for s in shims_of(address)) == ["busy", "known"]
