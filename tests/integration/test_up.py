"""What capsa up starts, and what it does not: an operator's runtime, a start that fails."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from capsa.config import Config
from capsa.runtime.host import HostRuntime

pytestmark = pytest.mark.integration


def test_capsa_runs_capsules_on_an_existing_cri_socket_and_leaves_it_running(
    private_runtime_config: Config, new_capsa: Callable[..., Any]
) -> None:
    # The operator's containerd, configured with capsa's CNI directories (the same state dir).
    cfg = private_runtime_config
    operators = HostRuntime(cfg)
    asyncio.run(operators.ensure_running())
    containerd_pid = operators.containerd.process.pid

    capsa = new_capsa(
        cfg.state_dir, CAPSA_CONTAINERD_SOCKET=cfg.cri_socket, CAPSA_REGISTRY_ENABLED="false"
    )
    theirs = sorted(capsa.processes())
    assert any("containerd --config" in p for p in theirs)
    capsa.start()
    assert sorted(capsa.processes()) == theirs, "capsa started a runtime of its own"

    capsa.create(
        {
            "kind": "capsule",
            "metadata": {"name": "on-theirs"},
            "spec": {
                "containers": [
                    {
                        "image": "busybox",
                        "command": ["sh", "-c", "echo ok > /i.html && exec httpd -f -p 80 -h /"],
                    }
                ]
            },
        }
    )
    capsule = capsa.wait_status("on-theirs", ("Running",))
    (address,) = [a["addr"] for net in capsule["addresses"].values() for a in net]
    with urllib.request.urlopen(f"http://{address}/i.html", timeout=5) as response:
        assert response.read() == b"ok\n"
    capsa.delete("on-theirs")
    capsa.wait_gone("on-theirs")

    assert capsa.stop() == 0
    assert sorted(capsa.processes()) == theirs, "capsa stopped a runtime it did not start"
    assert operators.containerd.process.pid == containerd_pid


def test_capsa_that_cannot_listen_says_which_setting_and_leaves_nothing_running(
    new_capsa: Callable[..., Any],
) -> None:
    capsa = new_capsa()
    host, _, port = capsa.env["CAPSA_API_LISTEN"].rpartition(":")
    with socket.socket() as taken:
        taken.bind((host, int(port)))
        taken.listen()
        run = subprocess.run(
            [sys.executable, "-m", "capsa", "up"],
            env=capsa.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert run.returncode == 1
    assert "api.listen (CAPSA_API_LISTEN)" in run.stderr, run.stderr[-2000:]
    assert capsa.processes() == [], "a failed start left containerd or the registry running"
