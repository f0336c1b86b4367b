"""What handlers find on the application: configuration, store, agent client, the defaults of
templates and quotas, the key of stored secrets, the local identity service (local mode only), the
capsule bodies that list pages reuse, and the watch that holds requests waiting for a change."""

from __future__ import annotations

from aiohttp import web

from capsa.api.agent_client import AgentClient
from capsa.api.body_cache import BodyCache
from capsa.api.schemas import TemplateDefaults
from capsa.api.watch import CapsuleWatch
from capsa.config import Config
from capsa.identity.service import IdentityService
from capsa.model.quota import QuotaLimits
from capsa.secrets import SecretBox
from capsa.store import Store

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
AGENTS = web.AppKey("agents", AgentClient)
TEMPLATE_DEFAULTS = web.AppKey("template_defaults", TemplateDefaults)
CAPSULE_BODIES = web.AppKey("capsule_bodies", BodyCache)
QUOTA_DEFAULTS = web.AppKey("quota_defaults", QuotaLimits)
SECRETS = web.AppKey("secrets", SecretBox)
IDENTITY = web.AppKey("identity", IdentityService)
CAPSULE_WATCH = web.AppKey("capsule_watch", CapsuleWatch)
