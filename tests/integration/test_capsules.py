"""Capsules end to end: the API of a real `capsa up`, on its own containerd, registry and network.

These are the acceptance tests of the capsule path: what a tenant does through the API, checked
against what the kernel and the runtime really hold.
"""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from capsa.cri.client import CriClient
from capsa.network.dataplane import host_ifname
from capsa.store import Store

pytestmark = pytest.mark.integration

HTTP_COMMAND = [
    "sh",
    "-c",
    "mkdir -p /www && echo hello from $HOSTNAME > /www/index.html && exec httpd -f -p 80 -h /www",
]
TICKER_COMMAND = [
    "sh",
    "-c",
    "trap 'exit 0' TERM; i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done",
]


def web_template(name: str, init: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "restartPolicy": "Always",
        "containers": [
            {"name": "http", "image": "busybox", "command": HTTP_COMMAND},
            {"name": "ticker", "image": "busybox", "command": TICKER_COMMAND},
        ],
    }
    if init:
        spec["initContainers"] = [
            {"name": "setup", "image": "busybox", "command": ["sh", "-c", "echo setup done"]}
        ]
    return {"kind": "capsule", "metadata": {"name": name, "labels": {"app": "web"}}, "spec": spec}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def ip_of(capsule: dict[str, Any]) -> str:
    addresses = [
        a["addr"] for net in capsule["addresses"].values() for a in net if a["version"] == 4
    ]
    assert len(addresses) == 1, capsule["addresses"]
    return str(addresses[0])


def http_get(ip: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{ip}/", timeout=2) as response:
                return str(response.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


def cri_state(socket: str, capsule_uuid: str) -> tuple[list[Any], list[Any]]:
    async def query() -> tuple[list[Any], list[Any]]:
        async with CriClient(socket) as cri:
            selector = {"io.capsa.capsule": capsule_uuid}
            sandboxes = await cri.list_pod_sandboxes(selector)
            return sandboxes, await cri.list_containers(labels=selector)

    return asyncio.run(query())


def allocated_ips(database_url: str) -> set[str]:
    async def query() -> set[str]:
        store = Store(database_url)
        try:
            return {str(p.ip_address) for p in await store.ports.list_ports(None)}
        finally:
            await store.close()

    return asyncio.run(query())


def logs(capsa: Any, container_uuid: str, query: str = "") -> str:
    status, body = capsa.request("GET", f"/v1/containers/{container_uuid}/logs?{query}")
    assert status == 200, body
    return str(body)


def host_usage(capsa: Any) -> tuple[float, int]:
    status, body = capsa.request("GET", f"/v1/hosts/{capsa.host_name}")
    assert status == 200, body
    return body["cpu_used"], body["mem_used"]


def test_a_capsule_runs_init_first_serves_http_logs_and_leaves_nothing(capsa: Any) -> None:
    name = unique("web")
    usage_before = host_usage(capsa)
    created = capsa.create(web_template(name))
    assert created["status"] == "Creating"

    capsule = capsa.wait_status(name, ("Running",))
    ip = ip_of(capsule)
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(capsa.cidr)
    assert http_get(ip).strip() == f"hello from {name}"

    (setup,) = capsule["init_containers"]
    http, ticker = capsule["containers"]
    assert setup["status"] == "Stopped"
    assert http["status"] == ticker["status"] == "Running"

    # The init container finished before the others started: its last log line is older
    # than the ticker's first one.
    time.sleep(2.5)
    setup_lines = logs(capsa, setup["uuid"], "timestamps=true").splitlines()
    ticker_lines = logs(capsa, ticker["uuid"], "timestamps=true").splitlines()
    assert setup_lines[-1].endswith(" setup done")
    assert ticker_lines[0].endswith(" tick 0")
    assert setup_lines[-1].split()[0] < ticker_lines[0].split()[0]

    assert logs(capsa, ticker["uuid"]).startswith("tick 0\ntick 1\n")
    assert logs(capsa, ticker["uuid"], "tail=1").count("\n") == 1
    assert logs(capsa, ticker["uuid"], "stdout=false&stderr=true") == ""

    sandboxes, containers = cri_state(capsa.cri_socket, capsule["uuid"])
    assert len(sandboxes) == 1
    assert len(containers) == 3
    veth = host_ifname(sandboxes[0].id, "eth0")
    assert veth in links()
    assert ip in allocated_ips(capsa.database_url)

    capsa.delete(name)
    capsa.wait_gone(name)

    sandboxes, containers = cri_state(capsa.cri_socket, capsule["uuid"])
    assert sandboxes == [] and containers == []
    assert veth not in links()
    assert ip not in allocated_ips(capsa.database_url)
    assert not (capsa.state_dir / "pods" / capsule["uuid"]).exists()
    assert host_usage(capsa) == usage_before, "the capsule's claim was not released"


def test_ten_capsules_at_once_all_run_with_distinct_addresses_and_delete_cleanly(
    capsa: Any,
) -> None:
    names = [unique(f"burst{i}") for i in range(10)]
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda n: capsa.create(web_template(n, init=False)), names))
        capsules = list(pool.map(lambda n: capsa.wait_status(n, ("Running",)), names))
        ips = [ip_of(c) for c in capsules]
        assert len(set(ips)) == 10
        answers = list(pool.map(http_get, ips))
    assert sorted(a.strip() for a in answers) == sorted(f"hello from {n}" for n in names)

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(capsa.delete, names))
        list(pool.map(capsa.wait_gone, names))
    for capsule in capsules:
        assert cri_state(capsa.cri_socket, capsule["uuid"]) == ([], [])
    assert not set(ips) & allocated_ips(capsa.database_url)


def test_an_image_that_does_not_exist_puts_the_capsule_in_error_naming_it(capsa: Any) -> None:
    name = unique("noimage")
    image = f"capsa-test/{name}:v1"
    capsa.create(
        {"kind": "capsule", "metadata": {"name": name}, "spec": {"containers": [{"image": image}]}}
    )
    capsule = capsa.wait_status(name, ("Error",))
    assert image in capsule["status_reason"]
    capsa.delete(name)
    capsa.wait_gone(name)


def test_a_template_with_an_unknown_key_is_refused_and_creates_nothing(capsa: Any) -> None:
    name = unique("typo")
    before = len(capsa.capsules())
    status, body = capsa.request(
        "POST",
        "/v1/capsules",
        {
            "template": {
                "kind": "capsule",
                "metadata": {"name": name},
                "spec": {"containers": [{"image": "busybox", "imagee": "typo"}]},
            }
        },
    )
    assert status == 400
    (error,) = body["errors"]
    assert "imagee" in error["detail"]
    assert capsa.get(name) is None
    assert len(capsa.capsules()) == before


def test_restart_policy_restarts_a_failing_container_and_never_leaves_a_finished_one(
    capsa: Any,
) -> None:
    crashing, finished = unique("crash"), unique("done")
    capsa.create(
        {
            "kind": "capsule",
            "metadata": {"name": crashing},
            "spec": {
                "restartPolicy": "OnFailure",
                "containers": [{"image": "busybox", "command": ["sh", "-c", "echo boom; exit 3"]}],
            },
        }
    )
    capsa.create(
        {
            "kind": "capsule",
            "metadata": {"name": finished},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"image": "busybox", "command": ["true"]}],
            },
        }
    )
    assert capsa.wait_status(finished, ("Stopped",))["containers"][0]["status"] == "Stopped"

    capsule = capsa.get(crashing)
    assert capsule is not None
    deadline = time.monotonic() + 30
    attempts = 0
    while time.monotonic() < deadline and attempts < 2:
        _, containers = cri_state(capsa.cri_socket, capsule["uuid"])
        attempts = max((c.attempt for c in containers), default=0)
        time.sleep(0.3)
    assert attempts >= 2, "the failing container was not restarted twice"
    assert capsa.get(crashing)["status"] == "Running"

    for name in (crashing, finished):
        capsa.delete(name)
        capsa.wait_gone(name)


def test_a_container_gets_its_command_args_workdir_env_and_limits(capsa: Any) -> None:
    name = unique("spec")
    capsa.create(
        {
            "kind": "capsule",
            "metadata": {"name": name},
            "spec": {
                "containers": [
                    {
                        "name": "probe",
                        "image": "busybox",
                        "command": ["sh", "-c"],
                        "args": ['echo "greeting=$GREETING dir=$(pwd) args=$0"; sleep 3600', "x"],
                        "workDir": "/tmp",
                        "env": {"GREETING": "hello world"},
                        "resources": {"requests": {"cpu": 0.25, "memory": 48}},
                    }
                ]
            },
        }
    )
    capsule = capsa.wait_status(name, ("Running",))
    (probe,) = capsule["containers"]
    deadline = time.monotonic() + 10
    while "greeting" not in logs(capsa, probe["uuid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert logs(capsa, probe["uuid"]) == "greeting=hello world dir=/tmp args=x\n"

    _, (container,) = cri_state(capsa.cri_socket, capsule["uuid"])
    cgroup = capsa.env["CAPSA_AGENT_CGROUP_PARENT"].strip("/")
    memory = Path("/sys/fs/cgroup/memory", cgroup, container.id, "memory.limit_in_bytes")
    quota = Path("/sys/fs/cgroup/cpu", cgroup, container.id, "cpu.cfs_quota_us")
    assert int(memory.read_text()) == 48 * 1024 * 1024
    assert int(quota.read_text()) == 25_000  # a quarter of the 100 ms period

    capsa.delete(name)
    capsa.wait_gone(name)
