"""The API application: routes, middleware and what handlers share.

Every path answers with and without a trailing slash, as clients send both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

from aiohttp import web

from capsa.api import capsules, containers, hosts, identity, quotas, registries, versions
from capsa.api.agent_client import AgentClient
from capsa.api.auth import Authenticator
from capsa.api.body_cache import BodyCache
from capsa.api.keys import (
    AGENTS,
    CAPSULE_BODIES,
    CAPSULE_WATCH,
    CONFIG,
    IDENTITY,
    QUOTA_DEFAULTS,
    SECRETS,
    STORE,
    TEMPLATE_DEFAULTS,
)
from capsa.api.middleware import add_response_headers, api_middleware
from capsa.api.neutron.errors import neutron_errors
from capsa.api.neutron.handlers import ROUTES as NEUTRON_ROUTES
from capsa.api.schemas import TemplateDefaults
from capsa.api.watch import CapsuleWatch
from capsa.config import Config
from capsa.identity.keystone import KeystoneValidator
from capsa.identity.service import IdentityService, TokenValidator
from capsa.identity.tokens import TokenSigner, load_or_create_key
from capsa.model.quota import QuotaLimits
from capsa.secrets import SecretBox
from capsa.store import Store

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/", versions.root),
    ("GET", "/v1", versions.v1),
    ("GET", "/v1/capsules", capsules.list_capsules),
    ("POST", "/v1/capsules", capsules.create_capsule),
    ("GET", "/v1/capsules/{ident}", capsules.show_capsule),
    ("DELETE", "/v1/capsules/{ident}", capsules.delete_capsule),
    ("GET", "/v1/containers", containers.list_containers),
    ("POST", "/v1/containers", containers.create_container),
    ("GET", "/v1/containers/{ident}", containers.show_container),
    ("PATCH", "/v1/containers/{ident}", containers.update_container),
    ("DELETE", "/v1/containers/{ident}", containers.delete_container),
    ("GET", "/v1/containers/{ident}/logs", containers.container_logs),
    ("POST", "/v1/containers/{ident}/start", containers.start_container),
    ("POST", "/v1/containers/{ident}/stop", containers.stop_container),
    ("POST", "/v1/containers/{ident}/reboot", containers.reboot_container),
    ("POST", "/v1/containers/{ident}/kill", containers.kill_container),
    ("POST", "/v1/containers/{ident}/rename", containers.rename_container),
    (
        "GET",
        "/v1/containers/{ident}/{action:attach|top|stats|get_archive|network_list|"
        "container_actions}",
        containers.unsupported_action,
    ),
    (
        "POST",
        "/v1/containers/{ident}/{action:pause|unpause|execute|execute_resize|resize|"
        "commit|put_archive|rebuild|resize_container|network_attach|network_detach|"
        "add_security_group|remove_security_group}",
        containers.unsupported_action,
    ),
    ("GET", "/v1/hosts", hosts.list_hosts),
    ("GET", "/v1/hosts/{ident}", hosts.show_host),
    ("GET", "/v1/quotas/{project_id}", quotas.show_quota),
    ("PUT", "/v1/quotas/{project_id}", quotas.update_quota),
    ("DELETE", "/v1/quotas/{project_id}", quotas.reset_quota),
    ("GET", "/v1/quotas/{project_id}/defaults", quotas.show_defaults),
    ("GET", "/v1/quota_classes/{class_name}", quotas.show_quota_class),
    ("PUT", "/v1/quota_classes/{class_name}", quotas.update_quota_class),
    ("GET", "/v1/registries", registries.list_registries),
    ("POST", "/v1/registries", registries.create_registry),
    ("GET", "/v1/registries/{ident}", registries.show_registry),
    ("PATCH", "/v1/registries/{ident}", registries.update_registry),
    ("DELETE", "/v1/registries/{ident}", registries.delete_registry),
    ("GET", "/v3", identity.version),
    ("POST", "/v3/auth/tokens", identity.issue_token),
    ("GET", "/v3/auth/tokens", identity.validate_token),
    ("HEAD", "/v3/auth/tokens", identity.validate_token),
    ("DELETE", "/v3/auth/tokens", identity.revoke_token),
    *NEUTRON_ROUTES,
)


def create_app(cfg: Config, store: Store) -> web.Application:
    """The API over ``store``."""
    # Bodies are size-checked by the handlers, which answer Zun's 400 naming the limit; aiohttp's
    # own limit only stops a body far beyond it.
    validator = _token_validator(cfg, store)
    app = web.Application(
        middlewares=[api_middleware(Authenticator(cfg, validator)), neutron_errors()],
        client_max_size=cfg.api.max_body_bytes + 1,
    )
    app[CONFIG] = cfg
    app[STORE] = store
    if isinstance(validator, IdentityService):
        app[IDENTITY] = validator
    if isinstance(validator, KeystoneValidator):
        app.on_cleanup.append(lambda _app: validator.close())
    app[AGENTS] = AgentClient(timeout=cfg.api.agent_timeout)
    app[CAPSULE_BODIES] = BodyCache(cfg.api.cached_capsule_bodies)
    watch = CapsuleWatch(store.capsules, store.hub, cfg.api.wait_recheck_interval)
    app[CAPSULE_WATCH] = watch
    # Before aiohttp waits for the requests under way: waiting ones answer now.
    app.on_shutdown.append(lambda _app: _closed(watch))
    app[TEMPLATE_DEFAULTS] = TemplateDefaults(
        cpu_millis=round(cfg.capsule.default_cpu * 1000),
        memory_mb=cfg.capsule.default_memory_mb,
        max_containers=cfg.capsule.max_containers,
    )
    app[QUOTA_DEFAULTS] = QuotaLimits(**vars(cfg.quota))
    app[SECRETS] = SecretBox.load_or_create(cfg.credentials_key_path)
    app.on_response_prepare.append(add_response_headers)
    app.cleanup_ctx.append(_close_agent_client)
    for method, path, handler in _ROUTES:
        app.router.add_route(method, path, handler)
        if path != "/":
            app.router.add_route(method, path + "/", handler)
    return app


def _token_validator(cfg: Config, store: Store) -> TokenValidator | None:
    """Who checks tokens in this ``auth.mode``: capsa's identity service, an external Keystone,
    or nobody (noauth)."""
    if cfg.auth.mode == "local":
        return IdentityService(
            store.identity,
            TokenSigner(load_or_create_key(cfg.token_key_path)),
            timedelta(seconds=cfg.auth.token_ttl),
        )
    if cfg.auth.mode == "keystone":
        return KeystoneValidator(cfg.auth)
    return None


async def _closed(watch: CapsuleWatch) -> None:
    watch.close()


async def _close_agent_client(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[AGENTS].close()
