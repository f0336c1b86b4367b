"""``capsa`` against a real API on a temporary store: output, progress and exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from tests.unit.api.api_helpers import StubAgent, config_for, zun_template
from tests.unit.cli.cli_helpers import CliRunner

from capsa.api.app import create_app
from capsa.cli import capsules
from capsa.cli.main import main
from capsa.model.capsule import Status
from capsa.store import Store, notify


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capsules, "POLL_INTERVAL", 0.05)


def template_file(tmp_path: Path, template: Any, name: str = "capsule.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(template))
    return str(path)


async def place(store: Store, name: str, agent_url: str = "http://127.0.0.1:1") -> str:
    capsule = await store.capsules.find(name, "default")
    assert capsule is not None
    await store.hosts.register("h1", agent_url, 4000, 4096, ("runc",))
    assert await store.hosts.claim(capsule.uuid, "h1", 250, 96)
    return capsule.uuid


async def test_create_prints_the_capsule_and_stores_it(
    capsa: CliRunner, store: Store, tmp_path: Path
) -> None:
    run = await capsa("capsule", "create", "-f", template_file(tmp_path, zun_template()))
    assert run.code == 0, run.stderr
    assert "web" in run.stdout and "Creating" in run.stdout
    stored = await store.capsules.find("web", "default")
    assert stored is not None
    assert stored.uuid in run.stdout


async def test_create_with_json_output_and_a_template_on_stdin(
    capsa: CliRunner, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", _Stdin(json.dumps(zun_template(name="piped"))))
    run = await capsa("--json", "capsule", "create", "-f", "-")
    assert run.code == 0, run.stderr
    body = json.loads(run.stdout)
    assert body["name"] == "piped"
    assert await store.capsules.get(body["uuid"]) is not None


async def test_a_refused_template_exits_1_with_the_api_reason(
    capsa: CliRunner, store: Store, tmp_path: Path
) -> None:
    run = await capsa(
        "capsule", "create", "-f", template_file(tmp_path, zun_template(restartPolicy="Sometimes"))
    )
    assert run.code == 1
    assert "HTTP 400" in run.stderr and "template.spec.restartPolicy" in run.stderr
    assert await store.capsules.count(None) == 0


async def test_create_names_the_network_and_groups_to_join(
    capsa: CliRunner, store: Store, tmp_path: Path
) -> None:
    network = await store.networks.create_network(project_id="default", name="back", mtu=1500)
    await store.networks.create_security_group(project_id="default", name="web")
    await store.networks.create_security_group(project_id="default", name="ssh")
    file = template_file(tmp_path, zun_template())
    args = ("capsule", "create", "-f", file, "--network", "back")
    run = await capsa(*args, "--security-group", "web", "--security-group", "ssh")
    assert run.code == 0, run.stderr
    stored = await store.capsules.find("web", "default")
    assert stored is not None
    assert stored.spec.annotations["capsa.io/network"] == network.name
    assert stored.spec.annotations["capsa.io/security-groups"] == "web,ssh"

    # Several networks, in the order given: the first is the capsule's first interface.
    front = await store.networks.create_network(project_id="default", name="front", mtu=1500)
    again = template_file(tmp_path, zun_template(name="web2"), "again.json")
    run = await capsa("capsule", "create", "-f", again, "--network", "front", "--network", "back")
    assert run.code == 0, run.stderr
    stored = await store.capsules.find("web2", "default")
    assert stored is not None
    assert stored.spec.annotations["capsa.io/network"] == f"{front.name},{network.name}"

    refused = await capsa("capsule", "create", "-f", file, "--network", "nowhere")
    assert refused.code == 1
    assert "HTTP 400" in refused.stderr and "network nowhere could not be found" in refused.stderr


async def test_a_yaml_pod_manifest_is_read(capsa: CliRunner, store: Store, tmp_path: Path) -> None:
    path = tmp_path / "pod.yaml"
    path.write_text(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: from-yaml\n"
        "spec:\n  containers:\n  - name: web\n    image: busybox\n"
    )
    run = await capsa("--json", "capsule", "create", "-f", str(path))
    assert run.code == 0, run.stderr
    assert json.loads(run.stdout)["name"] == "from-yaml"
    assert await store.capsules.find("from-yaml", "default") is not None


async def test_a_file_that_is_neither_json_nor_yaml_is_a_usage_error(
    capsa: CliRunner, tmp_path: Path
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("kind: Pod\nspec: [unclosed, list\n")
    run = await capsa("capsule", "create", "-f", str(path))
    assert run.code == 2
    assert "neither JSON" in run.stderr and "broken.yaml" in run.stderr


async def test_a_missing_template_file_is_a_usage_error(capsa: CliRunner, tmp_path: Path) -> None:
    run = await capsa("capsule", "create", "-f", str(tmp_path / "absent.json"))
    assert run.code == 2
    assert "absent.json" in run.stderr


async def agent_starts_web(store: Store, created: notify.Subscription) -> None:
    """What an agent writes while it starts the capsule "web" that the API just created."""
    assert await created.wait(10)
    capsule = await store.capsules.find("web", "default")
    assert capsule is not None
    await asyncio.sleep(0.2)
    await store.capsules.update_status(capsule.uuid, task_state="image_pulling")
    await asyncio.sleep(0.2)
    await store.capsules.update_container(capsule.containers[0].uuid, status=Status.RUNNING)
    await store.capsules.update_status(capsule.uuid, status=Status.RUNNING, task_state=None)


@pytest.mark.parametrize("api_waits", [True, False], ids=["api-waits", "api-cannot-wait"])
async def test_create_wait_reports_progress_until_running(
    capsa: CliRunner,
    store: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    api_waits: bool,
) -> None:
    url = None
    if api_waits:
        # Were it polling, its first pause would outlast its timeout.
        monkeypatch.setattr(capsules, "POLL_INTERVAL", 30.0)
    else:
        # An API that answers at once (304) is polled.
        unwaiting = TestServer(create_app(config_for(tmp_path, max_wait=0.0), store))
        await unwaiting.start_server()
        url = str(unwaiting.make_url("")).rstrip("/")
    helper = asyncio.create_task(agent_starts_web(store, store.hub.subscribe(notify.SCHEDULER)))
    file = template_file(tmp_path, zun_template())
    try:
        run = await capsa("capsule", "create", "--wait", "--timeout", "10", "-f", file, url=url)
    finally:
        if not api_waits:
            await unwaiting.close()
    await helper
    assert run.code == 0, run.stderr
    progress = run.stderr.splitlines()
    assert "capsule web: Creating (scheduling)" in progress
    assert "capsule web: Creating (image_pulling)" in progress
    assert "capsule web: Running" in progress
    assert "  container container-0: Running" in progress
    assert progress.index("capsule web: Creating (image_pulling)") < progress.index(
        "capsule web: Running"
    )
    assert "Running" in run.stdout


async def test_create_wait_exits_1_when_the_capsule_ends_in_error(
    capsa: CliRunner, store: Store, tmp_path: Path
) -> None:
    created = store.hub.subscribe(notify.SCHEDULER)

    async def scheduler_fails_it() -> None:
        assert await created.wait(10)
        capsule = await store.capsules.find("web", "default")
        assert capsule is not None
        await store.hosts.fail_placement(capsule.uuid, "no host has 64 GiB of memory free")

    helper = asyncio.create_task(scheduler_fails_it())
    run = await capsa("capsule", "create", "--wait", "-f", template_file(tmp_path, zun_template()))
    await helper
    assert run.code == 1
    assert "ended in Error: no host has 64 GiB of memory free" in run.stderr


async def test_create_wait_times_out_with_its_own_code(capsa: CliRunner, tmp_path: Path) -> None:
    run = await capsa(
        "capsule",
        "create",
        "--wait",
        "--timeout",
        "0.3",
        "-f",
        template_file(tmp_path, zun_template()),
    )
    assert run.code == 4
    assert "timed out after 0.3s" in run.stderr and "Creating" in run.stderr


async def test_list_follows_every_page_as_a_table_or_json(capsa: CliRunner, tmp_path: Path) -> None:
    # The test API serves at most two capsules a page.
    for i in range(5):
        run = await capsa(
            "capsule", "create", "-f", template_file(tmp_path, zun_template(name=f"c{i}"))
        )
        assert run.code == 0
    run = await capsa("capsule", "list")
    assert run.code == 0
    header, *rows = run.stdout.splitlines()
    assert header.split() == [
        "UUID",
        "NAME",
        "STATUS",
        "TASK_STATE",
        "ADDRESSES",
        "CPU",
        "MEMORY",
        "CREATED",
    ]
    assert [row.split()[1] for row in rows] == [f"c{i}" for i in range(5)]
    # Aligned: every row's NAME starts where the header's does.
    column = header.index("NAME")
    assert all(row[column - 2 : column] == "  " and row[column] == "c" for row in rows)
    run = await capsa("capsule", "list", "--json")
    assert [c["name"] for c in json.loads(run.stdout)] == [f"c{i}" for i in range(5)]


async def test_project_option_scopes_every_command(capsa: CliRunner, tmp_path: Path) -> None:
    file = template_file(tmp_path, zun_template())
    assert (await capsa("--project", "team-a", "capsule", "create", "-f", file)).code == 0
    run = await capsa("--project", "team-b", "--json", "capsule", "list")
    assert json.loads(run.stdout) == []
    run = await capsa("capsule", "show", "web", "--project", "team-a", "--json")
    assert json.loads(run.stdout)["project_id"] == "team-a"


async def test_show_by_name_and_unknown_capsule(capsa: CliRunner, tmp_path: Path) -> None:
    await capsa("capsule", "create", "-f", template_file(tmp_path, zun_template()))
    run = await capsa("capsule", "show", "web")
    assert run.code == 0
    assert "restart_policy  always" in run.stdout
    assert "container-0" in run.stdout and "busybox" in run.stdout
    run = await capsa("capsule", "show", "nothing")
    assert run.code == 1
    assert "Capsule nothing could not be found" in run.stderr


async def test_delete_of_an_unplaced_capsule(
    capsa: CliRunner, store: Store, tmp_path: Path
) -> None:
    await capsa("capsule", "create", "-f", template_file(tmp_path, zun_template()))
    run = await capsa("capsule", "delete", "web", "--wait")
    assert run.code == 0, run.stderr
    assert "deleted" in run.stdout
    assert await store.capsules.count(None) == 0


async def test_delete_wait_follows_the_agent_until_the_capsule_is_gone(
    capsa: CliRunner, store: Store, tmp_path: Path
) -> None:
    await capsa("capsule", "create", "-f", template_file(tmp_path, zun_template()))
    uuid = await place(store, "web")

    delete_requested = store.hub.subscribe(notify.host_topic("h1"))

    async def agent_tears_it_down() -> None:
        assert await delete_requested.wait(10)
        await asyncio.sleep(0.2)
        await store.capsules.remove(uuid)

    helper = asyncio.create_task(agent_tears_it_down())
    run = await capsa("capsule", "delete", "web", "--wait", "--timeout", "10")
    await helper
    assert run.code == 0, run.stderr
    assert "capsule web: Deleting (container_deleting)" in run.stderr
    assert "capsule web deleted" in run.stdout


async def test_delete_wait_times_out(capsa: CliRunner, store: Store, tmp_path: Path) -> None:
    await capsa("capsule", "create", "-f", template_file(tmp_path, zun_template()))
    await place(store, "web")
    run = await capsa("capsule", "delete", "web", "--wait", "--timeout", "0.3")
    assert run.code == 4
    assert "Deleting" in run.stderr


async def test_logs_of_the_first_or_a_named_container(
    capsa: CliRunner, store: Store, tmp_path: Path, agent: StubAgent
) -> None:
    template = zun_template(
        containers=[{"image": "busybox", "name": "app"}, {"image": "busybox", "name": "sidecar"}]
    )
    await capsa("capsule", "create", "-f", template_file(tmp_path, template))
    stored = await store.capsules.get(await place(store, "web", agent.url))
    assert stored is not None
    app, sidecar = (c.uuid for c in stored.containers)

    run = await capsa("logs", "web")
    assert run.code == 0, run.stderr
    assert run.stdout == "line 1\nline 2\n"
    run = await capsa("logs", "web", "-c", "sidecar", "--tail", "5", "--timestamps")
    assert run.code == 0
    assert [(q["uuid"], q["tail"], q["timestamps"]) for q in agent.queries] == [
        (app, "all", "false"),
        (sidecar, "5", "true"),
    ]
    run = await capsa("logs", "web", "-c", "nope")
    assert run.code == 2
    assert "app, sidecar" in run.stderr


async def test_logs_follow_streams_until_the_agent_ends(
    capsa: CliRunner, store: Store, tmp_path: Path, agent: StubAgent
) -> None:
    await capsa("capsule", "create", "-f", template_file(tmp_path, zun_template()))
    await place(store, "web", agent.url)
    agent.lines = ["héllo\n", "wörld\n"]
    agent.release.set()
    run = await capsa("logs", "web", "--follow")
    assert run.code == 0, run.stderr
    assert run.stdout == "héllo\nwörld\n"
    assert agent.queries[0]["follow"] == "true"


async def test_logs_of_an_unplaced_capsule_exit_1_with_the_reason(
    capsa: CliRunner, tmp_path: Path
) -> None:
    await capsa("capsule", "create", "-f", template_file(tmp_path, zun_template()))
    run = await capsa("logs", "web")
    assert run.code == 1
    assert "not on a host yet" in run.stderr


async def test_an_unreachable_api_exits_3(capsa: CliRunner) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = await capsa("capsule", "list", url=f"http://127.0.0.1:{port}")
    assert run.code == 3
    assert "cannot reach the capsa API" in run.stderr


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["capsule"], ["capsule", "create"], ["logs", "x", "--tail", "-1"], ["frobnicate"]):
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == 2
    assert main(["--url", "ftp://example", "capsule", "list"]) == 2


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    help_text = capsys.readouterr().out
    for code in ("0 ", "1 ", "2 ", "3 ", "4 "):
        assert f"\n  {code}" in help_text


async def test_the_console_script_runs_without_server_side_modules(
    capsa: CliRunner, api_url: str, tmp_path: Path
) -> None:
    await capsa("capsule", "create", "-f", template_file(tmp_path, zun_template()))
    probe = (
        "import sys, runpy\n"
        "sys.argv = ['capsa', '--json', 'capsule', 'list']\n"
        "try:\n"
        "    runpy.run_module('capsa.cli.main', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "heavy = sorted(m for m in sys.modules\n"
        "    if m.split('.')[0] in ('aiohttp', 'grpc', 'sqlalchemy', 'pydantic'))\n"
        "print('HEAVY', heavy, 'CODE', code, file=sys.stderr)\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        probe,
        env={**os.environ, "CAPSA_URL": api_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert "HEAVY [] CODE 0" in stderr.decode(), stderr.decode()
    assert [c["name"] for c in json.loads(stdout)] == ["web"]


class _Stdin:
    def __init__(self, text: str) -> None:
        self._text = text

    def read(self) -> str:
        return self._text
