"""capsa's local OCI registry: where the images capsa builds live, and the mirror of docker.io.

It is Debian's ``docker-registry`` (the CNCF distribution registry) with capsa's own config:
storage under ``cfg.registry_dir``, plain HTTP on ``cfg.registry.listen``, no authentication.
"""

from __future__ import annotations

import json

import aiohttp

from capsa.config import Config
from capsa.files import write_if_changed
from capsa.log import get_logger
from capsa.runtime.errors import HostRuntimeError
from capsa.runtime.process import ManagedProcess

log = get_logger(__name__)

# Both kinds of manifest the images may have; without these the registry answers 404 for OCI ones.
_MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)


# Short, so that something on the port that never answers does not stall the start for long.
_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=1.0)


class RegistryError(HostRuntimeError):
    """The local registry cannot be used; the message says why."""


def registry_host(cfg: Config) -> str:
    """``host:port`` under which clients on this host reach the registry (image names use it)."""
    host, _, port = cfg.registry.listen.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


class LocalRegistry:
    def __init__(self, cfg: Config, request_timeout: float = 5.0) -> None:
        self._cfg = cfg
        self._start_timeout = cfg.registry.start_timeout
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self.config_path = cfg.registry_dir / "config.yml"
        self.process = ManagedProcess(
            "registry",
            [cfg.registry.binary, "serve", str(self.config_path)],
            pidfile=cfg.run_dir / "registry.pid",
            logfile=cfg.registry_dir / "registry.log",
            # The registry idles between pulls: a smaller heap's headroom (Go's default is 100)
            # keeps 2 MB less resident, for a little more collecting while it serves a pull.
            environment={"GOGC": "50"},
        )

    @property
    def host(self) -> str:
        return registry_host(self._cfg)

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def render_config(self) -> str:
        # JSON is YAML, and json.dumps quotes every path correctly.
        config = {
            "version": "0.1",
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self._cfg.registry_dir / "storage")},
                "delete": {"enabled": True},
            },
            "http": {"addr": self._cfg.registry.listen},
        }
        return json.dumps(config, indent=2) + "\n"

    async def ensure_running(self) -> None:
        """Adopts a registry already running with this config, else starts one."""
        changed = write_if_changed(self.config_path, self.render_config())
        if self.process.is_running() and changed:
            log.info("registry config changed, restarting it", config=self.config_path)
            await self.stop()
        if not self.process.is_running():
            if await self._answers():
                raise RegistryError(
                    f"a registry that capsa did not start already answers on {self.url}; "
                    "stop it or choose another registry.listen"
                )
            await self.process.start()
        await self.process.wait_until_ready(
            self._answers, self._start_timeout, what=f"answering on {self.url}/v2/"
        )
        log.info("registry ready", url=self.url, pid=self.process.pid)

    async def stop(self, timeout: float = 10.0) -> None:
        await self.process.stop(timeout)

    async def manifest_digest(self, repository: str, tag: str) -> str | None:
        """The digest ``repository:tag`` points at, or None when the registry lacks it."""
        url = f"{self.url}/v2/{repository}/manifests/{tag}"
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as session,
                session.head(url, headers={"Accept": _MANIFEST_TYPES}) as resp,
            ):
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    raise RegistryError(f"HEAD {url} answered HTTP {resp.status}")
                return resp.headers.get("Docker-Content-Digest", "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RegistryError(f"cannot reach the local registry at {self.url}: {exc}") from exc

    async def has_manifest(self, repository: str, tag: str) -> bool:
        return await self.manifest_digest(repository, tag) is not None

    async def _answers(self) -> bool:
        try:
            async with (
                aiohttp.ClientSession(timeout=_PROBE_TIMEOUT) as session,
                session.get(f"{self.url}/v2/") as resp,
            ):
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False
