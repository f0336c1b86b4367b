"""Everything a host runs for capsa, brought up in order: registry -> images -> containerd.

``capsa up`` uses it like this::

    runtime = HostRuntime(cfg)
    await runtime.ensure_running()   # adopts what a previous capsa left running
    ...                              # the agent talks CRI to runtime.cri_endpoint
    await runtime.stop()             # containerd, then the registry
"""

from __future__ import annotations

from types import TracebackType

from capsa.config import Config
from capsa.log import get_logger
from capsa.runtime.containerd import Containerd
from capsa.runtime.images import ensure_local_images, sandbox_image
from capsa.runtime.registry import LocalRegistry

log = get_logger(__name__)


class HostRuntime:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.registry = LocalRegistry(cfg) if cfg.registry.enabled else None
        self.containerd = Containerd(cfg)

    @property
    def cri_endpoint(self) -> str:
        return self.cfg.cri_socket

    async def ensure_running(self) -> None:
        """Brings every piece up; on failure stops what it brought up and raises."""
        try:
            if self.registry is not None:
                await self.registry.ensure_running()
                await ensure_local_images(self.cfg, self.registry)
            await self.containerd.ensure_running(sandbox_image(self.cfg))
        except Exception:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stops what it started or adopted, in reverse order."""
        await self.containerd.stop()
        if self.registry is not None:
            await self.registry.stop()

    async def __aenter__(self) -> HostRuntime:
        await self.ensure_running()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
