"""The API application: routes, middleware and what handlers share.

Every path answers with and without a trailing slash, as clients send both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from capsa.api import capsules, containers, hosts, versions
from capsa.api.agent_client import AgentClient
from capsa.api.keys import AGENTS, CONFIG, STORE, TEMPLATE_DEFAULTS
from capsa.api.middleware import add_response_headers, api_middleware
from capsa.api.neutron.errors import neutron_errors
from capsa.api.neutron.handlers import ROUTES as NEUTRON_ROUTES
from capsa.api.schemas import TemplateDefaults
from capsa.config import Config
from capsa.store import Store

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/", versions.root),
    ("GET", "/v1", versions.v1),
    ("GET", "/v1/capsules", capsules.list_capsules),
    ("POST", "/v1/capsules", capsules.create_capsule),
    ("GET", "/v1/capsules/{ident}", capsules.show_capsule),
    ("DELETE", "/v1/capsules/{ident}", capsules.delete_capsule),
    ("GET", "/v1/containers/{container_uuid}/logs", containers.container_logs),
    ("GET", "/v1/hosts", hosts.list_hosts),
    ("GET", "/v1/hosts/{ident}", hosts.show_host),
    *NEUTRON_ROUTES,
)


def create_app(cfg: Config, store: Store) -> web.Application:
    """The API over ``store``."""
    # Bodies are size-checked by the handlers, which answer Zun's 400 naming the limit; aiohttp's
    # own limit only stops a body far beyond it.
    app = web.Application(
        middlewares=[api_middleware(cfg.api), neutron_errors()],
        client_max_size=cfg.api.max_body_bytes + 1,
    )
    app[CONFIG] = cfg
    app[STORE] = store
    app[AGENTS] = AgentClient(timeout=cfg.api.agent_timeout)
    app[TEMPLATE_DEFAULTS] = TemplateDefaults(
        cpu_millis=round(cfg.capsule.default_cpu * 1000),
        memory_mb=cfg.capsule.default_memory_mb,
        max_containers=cfg.capsule.max_containers,
    )
    app.on_response_prepare.append(add_response_headers)
    app.cleanup_ctx.append(_close_agent_client)
    for method, path, handler in _ROUTES:
        app.router.add_route(method, path, handler)
        if path != "/":
            app.router.add_route(method, path + "/", handler)
    return app


async def _close_agent_client(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[AGENTS].close()
