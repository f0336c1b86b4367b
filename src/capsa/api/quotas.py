"""``/v1/quotas/{project_id}`` and ``/v1/quota_classes/{class_name}``, as Zun serves them.

Bodies and answers are flat maps of Zun's four resources (``containers``, ``cpu`` in cores,
``memory`` in MiB, ``disk`` in GB; -1 unlimited); ``GET /v1/quotas/{p}?usages=true`` answers
``{"<resource>": {"limit": L, "in_use": U}}``. Changing quotas and reading or changing quota
classes is for admins; a project may read its own quotas. Zun added these APIs in 1.26 but serves
them at every microversion, and so does capsa.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from capsa.api.context import RequestContext
from capsa.api.errors import Invalid, OverQuota, PolicyNotAuthorized
from capsa.api.keys import CONFIG, QUOTA_DEFAULTS, STORE
from capsa.api.middleware import CONTEXT
from capsa.api.params import boolean, read_json, refuse_unknown
from capsa.api.views import json_response
from capsa.log import get_logger
from capsa.model.quota import DEFAULT_CLASS, QuotaLimits, QuotaResource, QuotaUsage
from capsa.store.quotas import OverQuota as StoreOverQuota

log = get_logger(__name__)

_RESOURCES = {r.value: r for r in QuotaResource}
_MAX_NAME = 255


async def show_quota(request: web.Request) -> web.Response:
    project_id = _project(request, "quota:get", admin_only=False)
    usages = boolean(request.query, "usages", False)
    refuse_unknown(request.query, frozenset({"usages"}))
    store = request.app[STORE]
    limits = await store.quotas.project_limits(project_id, request.app[QUOTA_DEFAULTS])
    if not usages:
        return json_response(limits.as_dict())
    return json_response(_with_usages(limits, await store.quotas.usage(project_id)))


async def show_defaults(request: web.Request) -> web.Response:
    _project(request, "quota:get_default", admin_only=False)
    # A project's defaults are the ``default`` class's limits, else the configured ones.
    limits = await request.app[STORE].quotas.class_limits(
        DEFAULT_CLASS, request.app[QUOTA_DEFAULTS]
    )
    return json_response(limits.as_dict())


async def update_quota(request: web.Request) -> web.Response:
    project_id = _project(request, "quota:update", admin_only=True)
    limits = await _limits_body(request)
    updated = await request.app[STORE].quotas.set_project_limits(
        project_id, limits, request.app[QUOTA_DEFAULTS]
    )
    log.info(
        "project quota updated",
        project=project_id,
        user=request[CONTEXT].user_id,
        **{r.value: v for r, v in limits.items()},
    )
    return json_response(updated.as_dict())


async def reset_quota(request: web.Request) -> web.Response:
    project_id = _project(request, "quota:delete", admin_only=True)
    await request.app[STORE].quotas.reset_project_limits(project_id)
    log.info("project quota reset to defaults", project=project_id, user=request[CONTEXT].user_id)
    # Zun's api-ref says 202, Zun itself answers 200; clients accept either.
    return web.Response(status=200)


async def show_quota_class(request: web.Request) -> web.Response:
    class_name = _quota_class(request, "quota_class:get")
    limits = await request.app[STORE].quotas.class_limits(class_name, request.app[QUOTA_DEFAULTS])
    return json_response(limits.as_dict())


async def update_quota_class(request: web.Request) -> web.Response:
    class_name = _quota_class(request, "quota_class:update")
    limits = await _limits_body(request)
    updated = await request.app[STORE].quotas.set_class_limits(
        class_name, limits, request.app[QUOTA_DEFAULTS]
    )
    log.info(
        "quota class updated",
        quota_class=class_name,
        user=request[CONTEXT].user_id,
        **{r.value: v for r, v in limits.items()},
    )
    return json_response(updated.as_dict())


def over_quota(exc: StoreOverQuota) -> OverQuota:
    """Zun's 403 for a create past a quota, naming each resource, its limit and its use."""
    names = ", ".join(e.resource.value for e in exc.excesses)
    details = "; ".join(
        f"{e.resource.value}: limit {e.limit}, in use {_number(e.in_use)}, "
        f"this request needs {_number(e.requested)} more"
        for e in exc.excesses
    )
    return OverQuota(
        f"Quota exceeded for resources: {names} (project {exc.project_id}: {details})."
    )


def _project(request: web.Request, action: str, *, admin_only: bool) -> str:
    context: RequestContext = request[CONTEXT]
    project_id = request.match_info["project_id"]
    if not context.is_admin and (admin_only or project_id != context.project_id):
        whose = "any project's" if admin_only else "another project's"
        raise PolicyNotAuthorized(
            f"Policy doesn't allow {action} to be performed: {whose} quotas are for admins."
        )
    return project_id


def _quota_class(request: web.Request, action: str) -> str:
    if not request[CONTEXT].is_admin:
        raise PolicyNotAuthorized(
            f"Policy doesn't allow {action} to be performed: quota classes are for admins."
        )
    name = request.match_info["class_name"]
    if len(name) > _MAX_NAME:
        raise Invalid(f"A quota class name has at most {_MAX_NAME} characters.")
    return name


async def _limits_body(request: web.Request) -> dict[QuotaResource, int]:
    """Zun's update body: some of the resources, each an integer (or a string of one) >= -1."""
    body = await read_json(request, request.app[CONFIG].api.max_body_bytes)
    if not isinstance(body, dict):
        raise Invalid(
            "The request body must be an object such as "
            '{"containers": 10, "cpu": 4, "memory": 4096, "disk": 20}.'
        )
    unknown = sorted(set(body) - set(_RESOURCES))
    if unknown:
        raise Invalid(
            f"Unknown quota resource(s): {', '.join(unknown)}; "
            f"acceptable resources are: {', '.join(_RESOURCES)}."
        )
    return {_RESOURCES[key]: _limit(key, value) for key, value in body.items()}


def _limit(resource: str, value: Any) -> int:
    if isinstance(value, str) and value.lstrip("-").isdigit() and value.count("-") <= 1:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise Invalid(
            f"Invalid quota for {resource}: {value!r}; use an integer of 0 or more, "
            "or -1 for unlimited."
        )
    return value


def _with_usages(limits: QuotaLimits, usage: QuotaUsage) -> dict[str, dict[str, int | float]]:
    return {
        r.value: {"limit": limits.of(r), "in_use": usage.in_limit_units(r)} for r in QuotaResource
    }


def _number(value: float) -> str:
    return f"{value:g}"
