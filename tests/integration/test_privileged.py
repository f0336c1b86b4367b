"""Privileged containers on a real `capsa up`: refused in a project until an admin allows it, then
really privileged on containerd and runc (they configure a network link and see the host's
devices), while the other containers of the same capsule stay unprivileged."""

from __future__ import annotations

import secrets
import time
from typing import Any

import pytest
from tests.integration.conftest import CapsaInstance

pytestmark = pytest.mark.integration

# What each container reports: whether it may add a network link to the capsule's namespace
# (CAP_NET_ADMIN), and whether it sees the host's /dev/kmsg (only privileged containers get the
# host's devices).
PROBE = (
    "if ip link add a-$NAME type veth peer name b-$NAME; then echo link added; "
    "else echo link refused; fi; "
    "if [ -e /dev/kmsg ]; then echo host devices; else echo no host devices; fi; "
    "echo probed; exec sleep 3600"
)


def probe(name: str, **container: Any) -> dict[str, Any]:
    return {"name": name, "image": "busybox", "command": ["sh", "-c", PROBE],
            "env": {"NAME": name}, **container}  # fmt: skip


def template(name: str) -> dict[str, Any]:
    return {
        "kind": "capsule",
        "metadata": {"name": name},
        "spec": {"containers": [probe("root", privileged=True), probe("plain")]},
    }


def report(capsa: CapsaInstance, container_uuid: str, member: dict[str, str]) -> list[str]:
    """The probe's lines, once it has run."""
    deadline = time.monotonic() + 30
    while True:
        status, text = capsa.request("GET", f"/v1/containers/{container_uuid}/logs", headers=member)
        assert status == 200, text
        if "probed" in text or time.monotonic() > deadline:
            return str(text).splitlines()
        time.sleep(0.2)


def test_a_privileged_capsule_is_refused_until_an_admin_allows_the_project(
    capsa: CapsaInstance,
) -> None:
    project = f"priv-{secrets.token_hex(4)}"
    member = capsa.token_headers(project)
    status, body = capsa.request("POST", "/v1/capsules", {"template": template("early")}, member)
    assert status == 403, body
    [error] = body["errors"]
    assert error["code"] == "container.policy-not-authorized"
    assert "may not run privileged containers" in error["detail"]
    assert "--allow-privileged" in error["detail"]
    status, listed = capsa.request("GET", "/v1/capsules", headers=member)
    assert listed["capsules"] == []

    allowed = capsa.capsa_cli("project", "set", project, "--allow-privileged")
    assert allowed.returncode == 0, allowed.stderr
    status, created = capsa.request("POST", "/v1/capsules", {"template": template("pr")}, member)
    assert status == 202, created
    capsule = capsa.wait_status(created["uuid"], ("Running", "Error"), headers=member)
    assert capsule["status"] == "Running", capsule["status_reason"]
    privileged, plain = capsule["containers"]
    assert (privileged["privileged"], plain["privileged"]) == (True, False)
    assert report(capsa, privileged["uuid"], member) == ["link added", "host devices", "probed"]
    # ip's own complaint, on stderr, may come before or after.
    assert {"link refused", "no host devices", "probed"} <= set(
        report(capsa, plain["uuid"], member)
    )

    # Forbidden again: new privileged capsules are refused, the running one is left alone.
    forbidden = capsa.capsa_cli("project", "set", project, "--no-allow-privileged")
    assert forbidden.returncode == 0, forbidden.stderr
    status, body = capsa.request("POST", "/v1/capsules", {"template": template("late")}, member)
    assert status == 403, body
    assert capsa.get(created["uuid"], member)["status"] == "Running"  # type: ignore[index]
    assert capsa.request("DELETE", f"/v1/capsules/{created['uuid']}", headers=member)[0] == 204
    capsa.wait_gone(created["uuid"], headers=member)
