"""``capsa project|user|role`` on the database, and the CLI authenticating to an API with local
identity through OS_* variables or clouds.yaml, as OpenStack clients do."""

from __future__ import annotations

import json
import stat
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from aiohttp.test_utils import TestServer
from tests.unit.api.api_helpers import config_for, zun_template
from tests.unit.api.identity_helpers import cheap_password_hashes
from tests.unit.cli.cli_helpers import CliRunner

from capsa.api.app import create_app
from capsa.cli import auth
from capsa.config import AuthConfig, Config
from capsa.identity.admin import IdentityAdmin
from capsa.store import Store

__all__ = ["cheap_password_hashes"]


@pytest.fixture
def local_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    """The test API's settings in local mode; the CLI's identity commands reach its database
    (tmp_path/capsa.db, the store fixture's) through CAPSA_STATE_DIR."""
    monkeypatch.setenv("CAPSA_CONFIG", "/dev/null")
    monkeypatch.setenv("CAPSA_STATE_DIR", str(tmp_path))
    return config_for(tmp_path, auth=AuthConfig(mode="local", clouds_yaml=""))


@pytest.fixture
async def local_api(store: Store, local_config: Config) -> AsyncIterator[str]:
    server = TestServer(create_app(local_config, store))
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


def template_file(tmp_path: Path, name: str) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(zun_template(name)))
    return str(path)


async def test_users_projects_and_roles_are_managed_on_the_database(
    capsa: CliRunner, store: Store, local_config: Config
) -> None:
    assert (await capsa("project", "create", "team-a", "--description", "A")).code == 0
    run = await capsa(
        "user", "create", "alice", "--project", "team-a", "--role", "member", "--password", "pw1"
    )
    assert run.code == 0, run.stderr
    run = await capsa("--json", "user", "list")
    [alice] = json.loads(run.stdout)
    assert alice["name"] == "alice" and alice["enabled"] is True
    # Never a password, nor its hash.
    assert "pw1" not in run.stdout and "argon2" not in run.stdout
    assert (
        await capsa("role", "add", "reader", "--user", "alice", "--project", "team-a")
    ).code == 0
    run = await capsa("--json", "role", "list", "--project", "team-a")
    assert {(a["user"], a["role"]) for a in json.loads(run.stdout)} == {
        ("alice", "member"),
        ("alice", "reader"),
    }
    run = await capsa("project", "create", "team-a")
    assert run.code == 1 and "exists already" in run.stderr
    run = await capsa("role", "add", "member", "--user", "nobody", "--project", "team-a")
    assert run.code == 1 and "nobody" in run.stderr
    run = await capsa("user", "create", "bob")
    assert run.code == 2 and "--password" in run.stderr
    project = await store.identity.find_project("team-a")
    assert project is not None and project.description == "A"


async def test_the_cli_authenticates_with_os_variables_and_stops_when_disabled(
    capsa: CliRunner,
    store: Store,
    local_api: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await capsa("project", "create", "team-a")
    await capsa(
        "user", "create", "alice", "--project", "team-a", "--role", "member", "--password", "pw1"
    )
    run = await capsa("capsule", "list", url=local_api)
    assert run.code == 1 and "401" in run.stderr
    monkeypatch.setenv("OS_AUTH_URL", f"{local_api}/v3")
    monkeypatch.setenv("OS_USERNAME", "alice")
    monkeypatch.setenv("OS_PASSWORD", "pw1")
    monkeypatch.setenv("OS_PROJECT_NAME", "team-a")
    run = await capsa("capsule", "create", "-f", template_file(tmp_path, "mine"), url=local_api)
    assert run.code == 0, run.stderr
    project = await store.identity.find_project("team-a")
    assert project is not None
    assert await store.capsules.find("mine", project.id) is not None
    assert "mine" in (await capsa("capsule", "list", url=local_api)).stdout
    assert (await capsa("user", "set", "alice", "--disable")).code == 0
    run = await capsa("capsule", "list", url=local_api)
    assert run.code == 1 and "refused to authenticate alice" in run.stderr
    monkeypatch.setenv("OS_PASSWORD", "wrong")
    assert (await capsa("user", "set", "alice", "--enable")).code == 0
    run = await capsa("capsule", "list", url=local_api)
    assert run.code == 1 and "refused to authenticate alice" in run.stderr


async def test_bootstrap_makes_the_accounts_once_and_a_clouds_yaml_the_cli_reads(
    capsa: CliRunner,
    store: Store,
    local_api: str,
    local_config: Config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    extra = tmp_path / "etc" / "clouds.yaml"
    extra.parent.mkdir()
    extra.write_text(yaml.safe_dump({"clouds": {"elsewhere": {"auth": {"auth_url": "x"}}}}))
    cfg = config_for(tmp_path, auth=AuthConfig(mode="local", clouds_yaml=str(extra)))
    admin = IdentityAdmin(store.identity)
    announced = await admin.bootstrap(cfg)
    assert len(announced) == 2 and all("password" in line for line in announced)
    copy = cfg.identity_dir / "clouds.yaml"
    first = {path: path.read_bytes() for path in (copy, extra)}
    for path in (copy, extra, cfg.identity_dir / "admin.password"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    clouds = yaml.safe_load(extra.read_text())["clouds"]
    assert set(clouds) == {"elsewhere", "capsa", "capsa-demo"}
    password = (cfg.identity_dir / "admin.password").read_text().strip()
    assert clouds["capsa"]["auth"]["password"] == password
    assert password in announced[0]

    # A second run changes nothing and prints nothing.
    assert await admin.bootstrap(cfg) == []
    assert {path: path.read_bytes() for path in first} == first
    assert len(await store.identity.users()) == 2

    # The CLI finds the demo cloud in clouds.yaml and acts in the demo project.
    monkeypatch.setattr(auth, "clouds_files", lambda environ, state_dir: [extra])
    clouds["capsa-demo"]["auth"]["auth_url"] = f"{local_api}/v3"
    extra.write_text(yaml.safe_dump({"clouds": clouds}))
    run = await capsa(
        "--os-cloud",
        "capsa-demo",
        "capsule",
        "create",
        "-f",
        template_file(tmp_path, "demo1"),
        url=local_api,
    )
    assert run.code == 0, run.stderr
    demo = await store.identity.find_project("demo")
    assert demo is not None and await store.capsules.find("demo1", demo.id) is not None
    run = await capsa("--os-cloud", "nowhere", "capsule", "list", url=local_api)
    assert run.code == 2 and "nowhere" in run.stderr


async def test_an_admin_allows_a_project_privileged_containers(
    capsa: CliRunner, store: Store, local_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    await capsa("project", "create", "team-p")
    project = await store.identity.find_project("team-p")
    assert project is not None
    run = await capsa("project", "set", "team-p", "--allow-privileged")
    assert run.code == 0, run.stderr
    assert "project team-p allowed privileged containers" in run.stdout
    assert await store.privileged.allowed(project.id)
    run = await capsa("--json", "project", "list")
    [listed] = json.loads(run.stdout)
    assert listed["allow_privileged"] is True
    run = await capsa("project", "set", project.id, "--allow-privileged")
    assert run.code == 0 and "already allowed" in run.stdout
    run = await capsa("project", "set", "team-p", "--no-allow-privileged", "--disable")
    assert run.code == 0 and "disabled, forbidden privileged containers" in run.stdout
    assert not await store.privileged.allowed(project.id)
    assert (await store.identity.find_project("team-p")) == replace(project, enabled=False)
    run = await capsa("project", "set", "team-p")
    assert run.code == 2 and "--allow-privileged" in run.stderr

    # With an external Keystone (or noauth) the project is named by its id, taken as given.
    monkeypatch.setenv("CAPSA_AUTH_MODE", "noauth")
    run = await capsa("project", "set", "0123abcd", "--allow-privileged")
    assert run.code == 0, run.stderr
    assert await store.privileged.allowed("0123abcd")
    run = await capsa("project", "set", "0123abcd", "--disable")
    assert run.code == 2 and "identity service is off" in run.stderr
