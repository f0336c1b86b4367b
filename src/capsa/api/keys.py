"""What handlers find on the application: configuration, store, agent client, template defaults,
who checks tokens, and the local identity service (local mode only)."""

from __future__ import annotations

from aiohttp import web

from capsa.api.agent_client import AgentClient
from capsa.api.auth import Authenticator
from capsa.api.schemas import TemplateDefaults
from capsa.config import Config
from capsa.identity.service import IdentityService
from capsa.store import Store

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
AGENTS = web.AppKey("agents", AgentClient)
TEMPLATE_DEFAULTS = web.AppKey("template_defaults", TemplateDefaults)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
IDENTITY = web.AppKey("identity", IdentityService)
