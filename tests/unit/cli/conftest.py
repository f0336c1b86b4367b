"""The API on a temporary SQLite store, for the CLI to talk to, and a way to run the CLI."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from tests.unit.api.api_helpers import agent, config_for
from tests.unit.cli.cli_helpers import CliRunner, Run

from capsa.api.app import create_app
from capsa.cli import auth
from capsa.cli.main import main
from capsa.store import Store

__all__ = ["agent"]


@pytest.fixture(autouse=True)
def no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's clouds.yaml and OS_* variables (after a `make up`) are not the test's."""
    for name in [n for n in os.environ if n.startswith("OS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(auth, "clouds_files", lambda environ, state_dir: [])


@pytest.fixture
async def api_url(store: Store, tmp_path: Path) -> AsyncIterator[str]:
    server = TestServer(create_app(config_for(tmp_path, max_limit=2, agent_timeout=2.0), store))
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.fixture
def capsa(api_url: str, capsys: pytest.CaptureFixture[str]) -> CliRunner:
    """Runs ``capsa --url <the test API> ARGS`` in a thread, as the event loop serves the API."""

    async def run(*args: str, url: str | None = None) -> Run:
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["--url", url or api_url, *args])
        captured = capsys.readouterr()
        return Run(int(code), captured.out, captured.err)

    return run
