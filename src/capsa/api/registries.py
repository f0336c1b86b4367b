"""``/v1/registries``: a project's private registries, as Zun serves them (Zun 1.30 on; like Zun,
capsa serves them at every microversion).

Bodies are ``{"registry": {"name", "domain", "username", "password"}}`` (``domain`` required at
create), answers ``{"registry": {...}}`` with the password always shown as ``***``. The password
is encrypted before it reaches the store (capsa.secrets) and never logged. A registry is found by
uuid or name within the caller's project; another project's answers 404 (admins reach every
project's, as in Zun). The rules are capsa.api.policy's: ``registry_get`` to look,
``registry_change`` to create, update and delete, ``registry_all_projects`` to reach every
project's.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from capsa.api.capsules import SORT_DIRS, next_url
from capsa.api.context import RequestContext
from capsa.api.errors import Conflict, Invalid, InvalidValue, NotFound
from capsa.api.keys import CONFIG, SECRETS, STORE
from capsa.api.middleware import CONTEXT
from capsa.api.params import boolean, one_of, positive_limit, read_json, refuse_unknown
from capsa.api.schemas.template import describe_error
from capsa.api.views import json_response, links
from capsa.log import get_logger
from capsa.model.image_ref import is_registry_host
from capsa.model.registry import Registry
from capsa.store.paging import MarkerNotFound, Page
from capsa.store.registries import FILTERS, SORT_KEYS, RegistryNameConflict

log = get_logger(__name__)

_LIST_PARAMETERS = frozenset({"all_projects", "limit", "marker", "sort_key", "sort_dir", *FILTERS})


class RegistryNotFound(NotFound):
    def __init__(self, ident: str) -> None:
        super().__init__(f"Registry {ident} could not be found.")


class RegistryAlreadyExists(Conflict):
    pass


def _check_domain(value: str) -> str:
    if not is_registry_host(value):
        raise ValueError(
            f"{value!r} is not a registry domain: write it as image names do, "
            "host[:port] without a scheme (registry.example.com, 10.0.0.5:5000)"
        )
    return value


class _RegistryFields(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # Zun's rules: a name of at least 2 characters, other fields non-empty.
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$", max_length=255)] | None = (
        None
    )
    domain: Annotated[str, Field(max_length=255), AfterValidator(_check_domain)] | None = None
    username: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    password: Annotated[str, Field(min_length=1, max_length=4096)] | None = None


class _RegistryBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    registry: _RegistryFields


async def create_registry(request: web.Request) -> web.Response:
    context = request[CONTEXT]
    context.authorize("registry_change", "registry:create")
    fields = await _fields(request)
    if fields.domain is None:
        raise Invalid("registry.domain: required field is missing")
    registry = Registry(
        uuid=str(uuid.uuid4()),
        project_id=context.project_id,
        user_id=context.user_id,
        name=fields.name,
        domain=fields.domain,
        username=fields.username,
        password_token=request.app[SECRETS].encrypt(fields.password) if fields.password else None,
    )
    try:
        registry = await request.app[STORE].registries.create(registry)
    except RegistryNameConflict:
        raise _already_exists(fields.name, context.project_id) from None
    log.info(
        "registry created",
        registry=registry.uuid,
        name=registry.name,
        domain=registry.domain,
        project=registry.project_id,
        user=context.user_id,
    )
    base_url = request.app[CONFIG].api_url
    return json_response(
        {"registry": format_registry(registry, base_url)},
        status=201,
        headers={"Location": f"{base_url}/v1/registries/{registry.uuid}"},
    )


async def list_registries(request: web.Request) -> web.Response:
    context = request[CONTEXT]
    config = request.app[CONFIG]
    query = request.query
    context.authorize("registry_get", "registry:get_all")
    refuse_unknown(query, _LIST_PARAMETERS)
    all_projects = boolean(query, "all_projects", False)
    scope = context.project_scope(
        all_projects, "registry:get_all_all_projects", "registry_all_projects"
    )
    page = Page(
        limit=positive_limit(query.get("limit"), config.api.max_limit),
        marker=query.get("marker") or None,
        sort_key=one_of(query, "sort_key", tuple(SORT_KEYS), "id"),
        sort_dir=one_of(query, "sort_dir", SORT_DIRS, "asc"),
    )
    filters = {key: query[key] for key in FILTERS if key in query}
    try:
        registries = await request.app[STORE].registries.list_page(scope, page, filters)
    except MarkerNotFound as exc:
        raise InvalidValue(f"Invalid marker: {exc}") from None
    uuids = [r.uuid for r in registries]
    return json_response(
        {
            "registries": [format_registry(r, config.api_url) for r in registries],
            "next": next_url(
                config.api_url, page, uuids, all_projects, "registries", tuple(filters.items())
            ),
        }
    )


async def show_registry(request: web.Request) -> web.Response:
    request[CONTEXT].authorize("registry_get", "registry:get_one")
    registry = await _find(request)
    return json_response({"registry": format_registry(registry, request.app[CONFIG].api_url)})


async def update_registry(request: web.Request) -> web.Response:
    context = request[CONTEXT]
    context.authorize("registry_change", "registry:update")
    registry = await _find(request)
    fields = await _fields(request)
    values: dict[str, Any] = fields.model_dump(exclude_unset=True, exclude={"password"})
    if fields.password is not None:
        values["password_token"] = request.app[SECRETS].encrypt(fields.password)
    if None in values.values():
        raise Invalid("registry fields cannot be set to null; give a new value")
    try:
        updated = await request.app[STORE].registries.update(registry.uuid, **values)
    except RegistryNameConflict:
        raise _already_exists(fields.name, registry.project_id) from None
    if updated is None:
        raise RegistryNotFound(request.match_info["ident"])
    log.info(
        "registry updated",
        registry=registry.uuid,
        fields=",".join(sorted(fields.model_fields_set)),
        project=registry.project_id,
        user=context.user_id,
    )
    return json_response({"registry": format_registry(updated, request.app[CONFIG].api_url)})


async def delete_registry(request: web.Request) -> web.Response:
    request[CONTEXT].authorize("registry_change", "registry:delete")
    registry = await _find(request)
    await request.app[STORE].registries.delete(registry.uuid)
    log.info(
        "registry deleted",
        registry=registry.uuid,
        project=registry.project_id,
        user=request[CONTEXT].user_id,
    )
    return web.Response(status=204)


def format_registry(registry: Registry, base_url: str) -> dict[str, Any]:
    return {
        "uuid": registry.uuid,
        "links": links(base_url, "registries", registry.uuid),
        "user_id": registry.user_id,
        "project_id": registry.project_id,
        "name": registry.name,
        "domain": registry.domain,
        "username": registry.username,
        # Zun never shows a registry's password, not even whether there is one.
        "password": "***",
    }


async def _find(request: web.Request) -> Registry:
    """The registry the path names, in the caller's project; those who may reach every
    project's (``registry_all_projects``) also find others'."""
    context: RequestContext = request[CONTEXT]
    ident = request.match_info["ident"]
    store = request.app[STORE]
    scopes: list[str | None] = [context.project_id]
    if context.can("registry_all_projects"):
        scopes.append(None)
    for scope in scopes:
        registry = await store.registries.find(ident, scope)
        if registry is not None:
            return registry
    raise RegistryNotFound(ident)


async def _fields(request: web.Request) -> _RegistryFields:
    body = await read_json(request, request.app[CONFIG].api.max_body_bytes)
    try:
        return _RegistryBody.model_validate(body).registry
    except ValidationError as exc:
        problems = "; ".join(describe_error(error, "") for error in exc.errors())
        raise Invalid(f"Invalid registry: {problems}") from None


def _already_exists(name: str | None, project_id: str) -> RegistryAlreadyExists:
    return RegistryAlreadyExists(
        f"A registry with name {name} already exists in project {project_id}."
    )
