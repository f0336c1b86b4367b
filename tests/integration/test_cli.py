"""The README's walk-through, with the `capsa` command and the example files, on a real capsa."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def cli(capsa: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """``capsa`` as the instance's admin, authenticated through the instance's clouds.yaml."""
    result: subprocess.CompletedProcess[str] = capsa.capsa_cli("--url", capsa.api_url, *args)
    return result


def ip_of(shown: dict[str, Any]) -> str:
    (address,) = [a["addr"] for net in shown["addresses"].values() for a in net]
    return str(address)


@pytest.mark.parametrize(
    ("example", "name", "container", "page"),
    [
        ("web.yaml", "web", "http", "hello from capsa"),
        ("pod.yaml", "hello", "hello", "hello from a pod"),
    ],
)
def test_the_walkthrough_creates_shows_reaches_reads_and_deletes(
    capsa: Any, example: str, name: str, container: str, page: str
) -> None:
    created = cli(capsa, "capsule", "create", "-f", str(EXAMPLES / example), "--wait")
    assert created.returncode == 0, created.stderr
    assert "Running" in created.stderr, "no progress was shown while waiting"

    listed = cli(capsa, "capsule", "list")
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[1:3] == [name, "Running"] for line in listed.stdout.splitlines()[1:])

    shown = cli(capsa, "--json", "capsule", "show", name)
    assert shown.returncode == 0, shown.stderr
    ip = ip_of(json.loads(shown.stdout))
    with urllib.request.urlopen(f"http://{ip}/", timeout=5) as response:
        assert response.read().decode().strip() == page

    # httpd -v logs each request: the one just made is there.
    logs = cli(capsa, "logs", name, "-c", container, "--tail", "5")
    assert logs.returncode == 0, logs.stderr
    assert "response:200" in logs.stdout, logs.stdout

    deleted = cli(capsa, "capsule", "delete", name, "--wait")
    assert deleted.returncode == 0, deleted.stderr
    gone = cli(capsa, "capsule", "show", name)
    assert gone.returncode == 1
    assert "HTTP 404" in gone.stderr and name in gone.stderr


def test_an_unreachable_api_exits_3(capsa: Any) -> None:
    run = capsa.capsa_cli("--url", "http://127.0.0.1:9", "capsule", "list")
    assert run.returncode == 3
    assert "127.0.0.1:9" in run.stderr
