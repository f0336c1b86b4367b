"""Quotas and private registries end to end, on a real `capsa up`.

The private registry is Debian's docker-registry with htpasswd authentication (bcrypt entries),
on 127.0.0.1 over plain HTTP: containerd 1.6 talks plain HTTP to a registry on a loopback address
without any hosts.toml, and sends the PullImage credentials to it as basic authentication, exactly
as it does to a TLS registry elsewhere.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from tests.integration.conftest import CapsaInstance, free_port

pytestmark = pytest.mark.integration


def sleeper(name: str, image: str = "busybox", **container: Any) -> dict[str, Any]:
    return {
        "kind": "capsule",
        "metadata": {"name": name},
        "spec": {"containers": [{"image": image, "command": ["sleep", "3600"], **container}]},
    }


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def member_of_new_project(capsa: CapsaInstance, prefix: str) -> tuple[str, dict[str, str]]:
    """A new project with a member in it: the project's id and the member's token header."""
    member = capsa.token_headers(unique(prefix))
    token = member["X-Auth-Token"]
    status, body = capsa.request(
        "GET", "/v3/auth/tokens", headers={**member, "X-Subject-Token": token}
    )
    assert status == 200, body
    return str(body["token"]["project"]["id"]), member


def test_twenty_concurrent_creates_against_a_quota_of_five(capsa: CapsaInstance) -> None:
    project, member = member_of_new_project(capsa, "quota")
    status, body = capsa.request("PUT", f"/v1/quotas/{project}", {"containers": 5})
    assert status == 200, body

    def create(i: int) -> tuple[int, Any]:
        return capsa.request("POST", "/v1/capsules", {"template": sleeper(f"q{i}")}, member)

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(create, range(20)))
    created = [body for status, body in results if status == 202]
    refused = [body for status, body in results if status != 202]
    assert len(created) == 5, results
    assert len(refused) == 15
    for body in refused:
        [error] = body["errors"]
        assert (error["status"], error["code"]) == (403, "container.over-quota")
        assert error["detail"].startswith("Quota exceeded for resources: containers")
    status, usage = capsa.request("GET", f"/v1/quotas/{project}?usages=true", headers=member)
    assert usage["containers"] == {"limit": 5, "in_use": 5}

    # A capsule being deleted still counts; once it is gone, its usage is back.
    for capsule in created:
        capsa.wait_status(capsule["uuid"], ("Running",), headers=member)
    gone = created[0]["uuid"]
    assert capsa.request("DELETE", f"/v1/capsules/{gone}", headers=member)[0] == 204
    capsa.wait_gone(gone, headers=member)
    status, usage = capsa.request("GET", f"/v1/quotas/{project}?usages=true", headers=member)
    assert usage["containers"] == {"limit": 5, "in_use": 4}
    status, body = capsa.request("POST", "/v1/capsules", {"template": sleeper("again")}, member)
    assert status == 202, body
    status, body = capsa.request("POST", "/v1/capsules", {"template": sleeper("over")}, member)
    assert status == 403, body


@dataclass
class PrivateRegistry:
    host: str
    username: str
    password: str
    image: str


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1)
    except urllib.error.HTTPError as exc:
        return exc.code == 401
    except OSError:
        return False
    return False


@pytest.fixture
def private_registry(capsa: CapsaInstance) -> Iterator[PrivateRegistry]:
    """docker-registry with htpasswd auth, holding busybox as private/busybox:1."""
    work = Path(tempfile.mkdtemp(prefix="capsa-it-private-registry-", dir="/tmp"))
    host = f"127.0.0.1:{free_port()}"
    username, password = "alice", secrets.token_urlsafe(12)
    entry = bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()
    (work / "htpasswd").write_text(f"{username}:{entry}\n")
    config = {
        "version": "0.1",
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(work / "storage")}},
        "http": {"addr": host},
        "auth": {"htpasswd": {"realm": "capsa-test", "path": str(work / "htpasswd")}},
    }
    (work / "config.yml").write_text(json.dumps(config))
    with (work / "registry.log").open("wb") as log:
        process = subprocess.Popen(
            ["docker-registry", "serve", str(work / "config.yml")], stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 15
        while not _answers(f"http://{host}/v2/"):
            assert process.poll() is None and time.monotonic() < deadline, (
                work / "registry.log"
            ).read_text()
            time.sleep(0.1)
        source = f"docker://{capsa.env['CAPSA_REGISTRY_LISTEN']}/library/busybox:latest"
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--src-tls-verify=false",
                "--dest-tls-verify=false",
                f"--dest-creds={username}:{password}",
                source,
                f"docker://{host}/private/busybox:1",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield PrivateRegistry(host, username, password, f"{host}/private/busybox:1")
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


def _registry(capsa: CapsaInstance, member: dict[str, str], **fields: str) -> dict[str, Any]:
    status, body = capsa.request("POST", "/v1/registries", {"registry": fields}, member)
    assert status == 201, body
    assert body["registry"]["password"] == "***"
    return dict(body["registry"])


def test_capsules_pull_from_a_private_registry_with_its_credentials(
    capsa: CapsaInstance, private_registry: PrivateRegistry
) -> None:
    reg = private_registry
    _, member = member_of_new_project(capsa, "private")
    _registry(capsa, member, name="wrong", domain=reg.host, username=reg.username, password="no")
    _registry(capsa, member, name="right", domain=reg.host, username=reg.username, password="x")
    # The right password arrives by update, as a tenant would fix a typo.
    status, body = capsa.request(
        "PATCH", "/v1/registries/right", {"registry": {"password": reg.password}}, member
    )
    assert status == 200, body

    def run(name: str, headers: dict[str, str], **container: Any) -> dict[str, Any]:
        template = sleeper(name, imagePullPolicy="Always", **container)
        status, body = capsa.request("POST", "/v1/capsules", {"template": template}, headers)
        assert status == 202, body
        return dict(body)

    # Refusals first, while the image is not on the host yet; Always pulls regardless.
    refused = run("refused", member, image="private/busybox:1", registry="wrong")
    stranger = run("stranger", member_of_new_project(capsa, "nobody")[1], image=reg.image)
    pulled = run("pulled", member, image="private/busybox:1", registry="right")

    failed = capsa.wait_status(refused["uuid"], ("Error", "Running"))
    assert failed["status"] == "Error"
    assert (
        f"registry {reg.host} refused the credentials of private registry 'wrong'"
        in (failed["status_reason"])
    )
    failed = capsa.wait_status(stranger["uuid"], ("Error", "Running"))
    assert failed["status"] == "Error"
    assert "the registry requires credentials" in failed["status_reason"]

    running = capsa.wait_status(pulled["uuid"], ("Running", "Error"))
    assert running["status"] == "Running", running["status_reason"]
    [container] = running["containers"]
    assert container["image"] == reg.image
    status, right = capsa.request("GET", "/v1/registries/right", headers=member)
    assert container["registry_id"] == right["registry"]["uuid"]

    # The password is nowhere in the database's files as written, nor in capsa's or containerd's
    # logs (capsa logs at DEBUG here).
    logs = [capsa.log_path, capsa.state_dir / "containerd" / "containerd.log"]
    for path in [*capsa.state_dir.glob("capsa.db*"), *logs]:
        assert reg.password.encode() not in path.read_bytes(), path
