"""The real OpenStack clients, installed from PyPI, against a real `capsa up`: `zun` and
`openstack capsule|appcontainer`, authenticating with passwords at capsa's /v3 and finding the
container endpoint in its catalog, as they do against Zun and Keystone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def template_file(tmp_path: Path, name: str) -> Path:
    """A Zun capsule template as YAML, the way people write them for `-f`/`--file`."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        "kind: capsule\n"
        f"metadata:\n  name: {name}\n  labels:\n    app: {name}\n"
        "spec:\n  containers:\n  - image: busybox\n    command: [sleep, '3600']\n"
    )
    return path


class Client:
    """One user's shell: the OS_* variables of a password login to capsa's /v3, nothing of the
    machine's own OpenStack settings."""

    def __init__(self, capsa: Any, user: str, password: str, project: str) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
        self.env.update(
            OS_AUTH_URL=f"{capsa.api_url}/v3",
            OS_USERNAME=user,
            OS_PASSWORD=password,
            OS_PROJECT_NAME=project,
            OS_USER_DOMAIN_NAME="Default",
            OS_PROJECT_DOMAIN_NAME="Default",
            OS_IDENTITY_API_VERSION="3",
            # An empty clouds.yaml: only the variables above count.
            OS_CLIENT_CONFIG_FILE=os.devnull,
        )

    def run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        executable = BIN / program
        assert executable.exists(), f"{program} is not installed: make .venv/.test-deps"
        return subprocess.run(
            [str(executable), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def ok(self, program: str, *args: str) -> str:
        done = self.run(program, *args)
        assert done.returncode == 0, f"{program} {args}: {done.stderr}"
        return done.stdout

    def openstack_json(self, *args: str) -> Any:
        return json.loads(self.ok("openstack", *args, "-f", "json"))


@pytest.fixture
def demo(capsa: Any) -> Client:
    """The demo user that capsa up bootstrapped, in project demo."""
    return Client(capsa, "demo", capsa.password("demo"), "demo")


def test_zun_creates_lists_describes_and_deletes_a_capsule(
    capsa: Any, demo: Client, tmp_path: Path
) -> None:
    name = unique("zun")
    created = demo.ok("zun", "capsule-create", "-f", str(template_file(tmp_path, name)))
    assert "Request to create capsule has been accepted" in created
    capsule = capsa.wait_status(name_in(capsa, name), ("Running",))
    listed = demo.ok("zun", "capsule-list")
    [row] = [line for line in listed.splitlines() if name in line]
    assert capsule["uuid"] in row and "Running" in row
    described = demo.ok("zun", "capsule-describe", name)
    assert capsule["uuid"] in described and "busybox" in described
    assert ipv4_of(capsule) in described
    assert "accepted" in demo.ok("zun", "capsule-delete", name)
    capsa.wait_gone(capsule["uuid"])
    gone = demo.run("zun", "capsule-describe", name)
    assert gone.returncode != 0 and "404" in gone.stderr


def test_openstack_capsule_commands_and_appcontainer_list(
    capsa: Any, demo: Client, tmp_path: Path
) -> None:
    name = unique("osc")
    created = demo.openstack_json("capsule", "create", "--file", str(template_file(tmp_path, name)))
    assert created["name"] == name and created["status"] == "Creating"
    capsule = capsa.wait_status(created["uuid"], ("Running",))
    listed = demo.openstack_json("capsule", "list")
    assert {"uuid": created["uuid"], "name": name, "status": "Running"}.items() <= next(
        c for c in listed if c["uuid"] == created["uuid"]
    ).items()
    shown = demo.openstack_json("capsule", "show", name)
    assert shown["uuid"] == created["uuid"] and shown["status"] == "Running"
    # The plugin prints the capsule's addresses as its IPs.
    assert shown["addresses"] == ipv4_of(capsule)
    assert shown["labels"] == {"app": name}
    # Zun lists standalone containers only; a capsule's are reached through their capsule.
    assert demo.openstack_json("appcontainer", "list") == []
    demo.ok("openstack", "capsule", "delete", created["uuid"])
    capsa.wait_gone(created["uuid"])
    assert all(c["uuid"] != created["uuid"] for c in demo.openstack_json("capsule", "list"))


def test_two_users_in_two_projects_neither_sees_nor_deletes_the_others(
    capsa: Any, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:6]
    users, passwords = {}, []
    for who in ("alice", "bob"):
        user, project, password = f"{who}-{suffix}", f"team-{who}-{suffix}", uuid.uuid4().hex
        capsa.add_user(user, password, project)
        users[who] = Client(capsa, user, password, project)
        passwords.append(password)
    alice, bob = users["alice"], users["bob"]
    name = unique("private")
    mine = alice.openstack_json("capsule", "create", "--file", str(template_file(tmp_path, name)))
    theirs = unique("bobs")
    bob.ok("zun", "capsule-create", "-f", str(template_file(tmp_path, theirs)))
    assert theirs in bob.ok("zun", "capsule-list")

    assert [c["uuid"] for c in alice.openstack_json("capsule", "list")] == [mine["uuid"]]
    assert mine["uuid"] not in bob.ok("zun", "capsule-list")
    assert all(c["uuid"] != mine["uuid"] for c in bob.openstack_json("capsule", "list"))
    # Both clients report a failed delete with the API's 404 but exit 0; a failed show exits 1.
    for program, args, exit_code in (
        ("openstack", ("capsule", "show", mine["uuid"]), 1),
        ("zun", ("capsule-describe", name), 1),
        ("zun", ("capsule-delete", mine["uuid"]), 0),
        ("openstack", ("capsule", "delete", mine["uuid"]), 0),
    ):
        refused = bob.run(program, *args)
        said = refused.stdout + refused.stderr
        assert "could not be found" in said and "404" in said, said
        assert refused.returncode == exit_code, (program, args, said)
    # Still there, and still alice's.
    shown = alice.openstack_json("capsule", "show", mine["uuid"])
    assert shown["uuid"] == mine["uuid"] and shown["status"] != "Deleting"
    # The clients logged in with their passwords many times; capsa's log (DEBUG here) has none.
    log = capsa.log_path.read_text()
    assert all(password not in log for password in passwords)


def ipv4_of(capsule: dict[str, Any]) -> str:
    (address,) = [a["addr"] for net in capsule["addresses"].values() for a in net]
    return str(address)


def name_in(capsa: Any, name: str) -> str:
    """The uuid of the capsule ``name`` (the admin finds every project's by listing them all)."""
    return str(next(c["uuid"] for c in capsa.capsules() if c["name"] == name))
