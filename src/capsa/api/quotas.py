"""``/v1/quotas/{project_id}`` and ``/v1/quota_classes/{class_name}``, as Zun serves them.

Bodies and answers are flat maps of Zun's four resources (``containers``, ``cpu`` in cores,
``memory`` in MiB, ``disk`` in GB; -1 unlimited); ``GET /v1/quotas/{p}?usages=true`` answers
``{"<resource>": {"limit": L, "in_use": U}}``. Who may do what is capsa.api.policy's: by default a
project reads its own quotas, admins read every project's and the quota classes and change them.
Zun added these APIs in 1.26 but serves them at every microversion, and so does capsa.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from capsa.api.context import RequestContext
from capsa.api.errors import Invalid, OverQuota
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
    project_id = _readable_project(request, "quota:get")
    usages = boolean(request.query, "usages", False)
    refuse_unknown(request.query, frozenset({"usages"}))
    store = request.app[STORE]
    limits = await store.quotas.project_limits(project_id, request.app[QUOTA_DEFAULTS])
    if not usages:
        return json_response(limits.as_dict())
    return json_response(_with_usages(limits, await store.quotas.usage(project_id)))


async def show_defaults(request: web.Request) -> web.Response:
    _readable_project(request, "quota:get_default")
    # A project's defaults are the ``default`` class's limits, else the configured ones.
    limits = await request.app[STORE].quotas.class_limits(
        DEFAULT_CLASS, request.app[QUOTA_DEFAULTS]
    )
    return json_response(limits.as_dict())


async def update_quota(request: web.Request) -> web.Response:
    request[CONTEXT].authorize("quota_change", "quota:update")
    project_id = request.match_info["project_id"]
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
    request[CONTEXT].authorize("quota_change", "quota:delete")
    project_id = request.match_info["project_id"]
    await request.app[STORE].quotas.reset_project_limits(project_id)
    log.info("project quota reset to defaults", project=project_id, user=request[CONTEXT].user_id)
    # Zun's api-ref says 202, Zun itself answers 200; clients accept either.
    return web.Response(status=200)


async def show_quota_class(request: web.Request) -> web.Response:
    request[CONTEXT].authorize("quota_all_projects", "quota_class:get")
    class_name = _quota_class(request)
    limits = await request.app[STORE].quotas.class_limits(class_name, request.app[QUOTA_DEFAULTS])
    return json_response(limits.as_dict())


async def update_quota_class(request: web.Request) -> web.Response:
    request[CONTEXT].authorize("quota_change", "quota_class:update")
    class_name = _quota_class(request)
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


def _readable_project(request: web.Request, action: str) -> str:
    """The project of the path, once the caller may read its quotas: its own project's with
    ``quota_get``, another's with ``quota_all_projects`` too."""
    context: RequestContext = request[CONTEXT]
    project_id = request.match_info["project_id"]
    context.authorize("quota_get", action)
    if project_id != context.project_id:
        context.authorize("quota_all_projects", f"{action} (another project's quotas)")
    return project_id


def _quota_class(request: web.Request) -> str:
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
