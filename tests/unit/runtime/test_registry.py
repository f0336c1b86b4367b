from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from capsa.config import Config, RegistryConfig
from capsa.runtime.process import ProcessError
from capsa.runtime.registry import LocalRegistry, RegistryError, registry_host

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _config(tmp_path: Path, listen: str = "127.0.0.1:5999") -> Config:
    return Config(state_dir=tmp_path, registry=RegistryConfig(listen=listen))


def test_config_has_storage_listen_delete_and_no_auth(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    # JSON is YAML: the registry reads this file as it is.
    config = json.loads(LocalRegistry(cfg).render_config())
    assert config["storage"]["filesystem"]["rootdirectory"].startswith(str(cfg.registry_dir))
    assert config["storage"]["delete"]["enabled"] is True
    assert config["http"]["addr"] == "127.0.0.1:5999"
    assert "auth" not in config
    assert config["log"]["level"] in ("error", "warn")


def test_process_runs_serve_with_its_own_config(tmp_path: Path) -> None:
    registry = LocalRegistry(_config(tmp_path))
    assert registry.process.argv == ["docker-registry", "serve", str(registry.config_path)]
    assert registry.config_path.is_relative_to(tmp_path)
    assert registry.process.pidfile.parent == tmp_path / "run"


@pytest.mark.parametrize(
    ("listen", "host"),
    [
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("0.0.0.0:5001", "127.0.0.1:5001"),
        (":5002", "127.0.0.1:5002"),
        ("localhost:5003", "localhost:5003"),
    ],
)
def test_clients_reach_a_wildcard_listen_on_loopback(
    tmp_path: Path, listen: str, host: str
) -> None:
    cfg = _config(tmp_path, listen)
    assert registry_host(cfg) == host
    assert LocalRegistry(cfg).url == f"http://{host}"


@pytest.fixture
async def fake_registry() -> AsyncIterator[TestServer]:
    """Serves one OCI manifest, only to clients that accept OCI manifests (as distribution does)."""

    async def manifest(request: web.Request) -> web.Response:
        known = (
            request.match_info["repo"] == "library/busybox" and request.match_info["tag"] == "1.35"
        )
        if not known or OCI_MANIFEST not in request.headers.get("Accept", ""):
            return web.Response(status=404)
        return web.Response(headers={"Docker-Content-Digest": "sha256:abc"})

    async def base(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_route("HEAD", "/v2/{repo:.+}/manifests/{tag}", manifest)
    app.router.add_get("/v2/", base)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


async def test_manifest_digest_and_has_manifest(tmp_path: Path, fake_registry: TestServer) -> None:
    registry = LocalRegistry(_config(tmp_path, f"127.0.0.1:{fake_registry.port}"))
    assert await registry.manifest_digest("library/busybox", "1.35") == "sha256:abc"
    assert await registry.has_manifest("library/busybox", "1.35")
    assert not await registry.has_manifest("library/busybox", "9.9")
    assert await registry.manifest_digest("capsa/pause", "3.9") is None


async def test_foreign_registry_on_the_port_is_not_adopted(
    tmp_path: Path, fake_registry: TestServer
) -> None:
    registry = LocalRegistry(_config(tmp_path, f"127.0.0.1:{fake_registry.port}"))
    with pytest.raises(RegistryError, match="capsa did not start"):
        await registry.ensure_running()
    assert not registry.process.is_running()


async def test_unreachable_registry_is_a_clear_error(tmp_path: Path) -> None:
    registry = LocalRegistry(_config(tmp_path, "127.0.0.1:1"), request_timeout=2)
    with pytest.raises(
        RegistryError, match=r"cannot reach the local registry at http://127\.0\.0\.1:1"
    ):
        await registry.manifest_digest("capsa/pause", "3.9")


async def test_a_registry_that_dies_is_reported_with_its_log(tmp_path: Path) -> None:
    binary = tmp_path / "docker-registry"
    binary.write_text(
        "#!/bin/sh\necho 'listen tcp 127.0.0.1:1: bind: permission denied' >&2\nexit 1\n"
    )
    binary.chmod(0o755)
    cfg = Config(
        state_dir=tmp_path, registry=RegistryConfig(listen="127.0.0.1:1", binary=str(binary))
    )
    with pytest.raises(ProcessError, match="registry exited before") as err:
        await LocalRegistry(cfg).ensure_running()
    assert "bind: permission denied" in str(err.value)
