"""``/v1/capsules``: create, list, show and delete capsules, as Zun does.

Zun serves capsules at every microversion, in its legacy shape below 1.32 (see views). A capsule is
found by uuid or by name within the caller's project; an admin who names a capsule of another
project finds it too, as in Zun. Deletion is asynchronous: 204 at once, then 404 once it is gone.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar
from urllib.parse import urlencode

import orjson
from aiohttp import web
from aiohttp.helpers import ETAG_ANY

from capsa.api.context import RequestContext
from capsa.api.errors import (
    CapsuleAlreadyExists,
    CapsuleNotFound,
    Conflict,
    ContainerAlreadyExists,
    ContainerNotFound,
    InvalidCapsuleTemplate,
    InvalidValue,
    PolicyNotAuthorized,
)
from capsa.api.keys import (
    CAPSULE_BODIES,
    CAPSULE_WATCH,
    CONFIG,
    QUOTA_DEFAULTS,
    STORE,
    TEMPLATE_DEFAULTS,
)
from capsa.api.middleware import CONTEXT
from capsa.api.params import (
    boolean,
    one_of,
    positive_limit,
    preferred_statuses,
    preferred_wait,
    read_json,
)
from capsa.api.quotas import over_quota
from capsa.api.schemas import TemplateError, parse_create_body
from capsa.api.views import (
    FIELD_RULES,
    CapsuleFormatter,
    encoded_list_response,
    encoded_response,
)
from capsa.log import get_logger
from capsa.model.capsule import (
    Capsule,
    CapsuleKind,
    CapsuleSpec,
    Container,
    ContainerKind,
    ContainerSpec,
    PullPolicy,
    Status,
)
from capsa.model.network import (
    MAX_CAPSULE_NETWORKS,
    NETWORK_ANNOTATION,
    SECURITY_GROUPS_ANNOTATION,
    Attachment,
)
from capsa.model.registry import RegistryDirectory
from capsa.store import Store
from capsa.store.capsules import SORT_KEYS, AmbiguousName, CapsuleState, NameConflict
from capsa.store.networks import Ambiguous, NotFound, RepeatedNetwork
from capsa.store.paging import MarkerNotFound, Page
from capsa.store.quotas import OverQuota

log = get_logger(__name__)

SORT_DIRS = ("asc", "desc")
DEFAULT_SORT_KEY = "created_at"

T = TypeVar("T")


def formatter(request: web.Request) -> CapsuleFormatter:
    context = request[CONTEXT]
    hidden = frozenset(field for field, rule in FIELD_RULES.items() if not context.can(rule))
    return CapsuleFormatter(request.app[CONFIG].api_url, context.version, hidden)


async def create_capsule(request: web.Request) -> web.Response:
    context = request[CONTEXT]
    context.authorize("capsule_create")
    config = request.app[CONFIG]
    body = await read_json(request, config.api.max_body_bytes)
    capsule_uuid = str(uuid.uuid4())
    store = request.app[STORE]
    registries = RegistryDirectory(tuple(await store.registries.of_project(context.project_id)))
    try:
        spec = parse_create_body(
            body,
            request.app[TEMPLATE_DEFAULTS],
            fallback_name=f"capsule-{capsule_uuid[:13]}",
            registries=registries,
        )
    except TemplateError as exc:
        raise InvalidCapsuleTemplate(f"Invalid capsule template: {exc}") from None
    await authorize_fields(store, context, spec)
    await _check_attachment(store, context.project_id, spec.annotations)
    capsule = new_capsule(capsule_uuid, spec, context)
    version = await store_new(request, capsule, privileged=spec.privileged)
    return accepted(request, capsule, version)


async def store_new(request: web.Request, capsule: Capsule, **log_fields: object) -> str:
    """Stores a new capsule (or single container) if its project's quota allows: Zun's 409 for
    a name the project already uses, its 403 past a quota; nothing is stored then. Returns the
    version it was stored at."""
    context = request[CONTEXT]
    spec = capsule.spec
    kind = spec.kind
    try:
        version = await request.app[STORE].capsules.create(capsule, request.app[QUOTA_DEFAULTS])
    except NameConflict:
        exists = CapsuleAlreadyExists if kind is CapsuleKind.CAPSULE else ContainerAlreadyExists
        raise exists(
            f"A {kind} with name {spec.name} already exists in project {context.project_id}."
        ) from None
    except OverQuota as exc:
        log.info(f"{kind} refused: over quota", name=spec.name, project=context.project_id)
        raise over_quota(exc) from None
    log.info(
        f"{kind} accepted",
        **{kind.value: capsule.uuid},
        name=spec.name,
        project=context.project_id,
        user=context.user_id,
        **log_fields,
    )
    return version


def accepted(request: web.Request, capsule: Capsule, version: str) -> web.Response:
    """The 202 of a new capsule (or single container): the body its show gives, with the show's
    ETag, so that a client can wait for the first change at once (If-None-Match) instead of
    asking for what it was just told. Content-Location says whose representation the ETag is."""
    kind = capsule.spec.kind
    view = formatter(request)
    collection = "capsules" if kind is CapsuleKind.CAPSULE else "containers"
    url = f"{request.app[CONFIG].api_url}/v1/{collection}/{capsule.uuid}"
    response = encoded_response(
        _shown(view, kind, capsule), status=202, headers={"Location": url, "Content-Location": url}
    )
    response.etag = _etag(view, kind, version)
    return response


def _shown(view: CapsuleFormatter, kind: CapsuleKind, capsule: Capsule) -> bytes:
    """The encoded body of a show of ``capsule`` (a capsule's, or a single container's)."""
    fields = (
        view.capsule(capsule) if kind is CapsuleKind.CAPSULE else view.single_container(capsule)
    )
    return orjson.dumps(fields)


async def _check_attachment(store: Store, project_id: str, annotations: dict[str, str]) -> None:
    """The networks and security groups the annotations name must be the project's to use (the
    agent resolves them again when it allocates the ports), each network named once."""
    attachment = Attachment.from_annotations(annotations)
    if len(attachment.networks) > MAX_CAPSULE_NETWORKS:
        raise _invalid_attachment(
            f"a capsule joins at most {MAX_CAPSULE_NETWORKS} networks, "
            f"not {len(attachment.networks)}"
        )
    try:
        # Most capsules name neither (their project's default network and group): no reads.
        if attachment.networks:
            await store.networks.resolve_networks(project_id, attachment.networks)
        if attachment.security_groups:
            await store.networks.resolve_security_groups(project_id, attachment.security_groups)
    except (NotFound, Ambiguous, RepeatedNetwork) as exc:
        raise _invalid_attachment(str(exc)) from None


def _invalid_attachment(reason: str) -> InvalidCapsuleTemplate:
    return InvalidCapsuleTemplate(
        f"Invalid capsule template: annotations {NETWORK_ANNOTATION} and "
        f"{SECURITY_GROUPS_ANNOTATION}: {reason}"
    )


async def list_capsules(request: web.Request) -> web.Response:
    context = request[CONTEXT]
    config = request.app[CONFIG]
    context.authorize("capsule_get", "capsule:get_all")
    query = request.query
    all_projects = boolean(query, "all_projects", False)
    scope = context.project_scope(all_projects, "capsule:get_all_all_projects")
    page = Page(
        limit=positive_limit(query.get("limit"), config.api.max_limit),
        marker=query.get("marker") or None,
        sort_key=one_of(query, "sort_key", tuple(SORT_KEYS), DEFAULT_SORT_KEY),
        sort_dir=one_of(query, "sort_dir", SORT_DIRS, "asc"),
    )
    store = request.app[STORE]
    try:
        versions = await store.capsules.list_page_versions(scope, page)
    except MarkerNotFound as exc:
        raise InvalidValue(f"Invalid marker: {exc}") from None
    view = formatter(request)
    bodies = request.app[CAPSULE_BODIES]
    found = {
        capsule_uuid: bodies.get(view.shape, capsule_uuid, version)
        for capsule_uuid, version in versions
    }
    missing = [capsule_uuid for capsule_uuid, body in found.items() if body is None]
    loaded = await store.capsules.get_many(missing) if missing else {}
    encoded = []
    for capsule_uuid, version in versions:
        body = found[capsule_uuid]
        if body is None:
            capsule = loaded.get(capsule_uuid)
            if capsule is None:
                continue  # deleted since its version was read
            body = orjson.dumps(view.capsule(capsule))
            bodies.put(view.shape, capsule_uuid, version, body)
        encoded.append(body)
    next_page = next_url(
        config.api_url, page, [capsule_uuid for capsule_uuid, _ in versions], all_projects
    )
    return encoded_list_response("capsules", encoded, next_page)


async def show_capsule(request: web.Request) -> web.Response:
    context = request[CONTEXT]
    context.authorize("capsule_get")
    return await show_cached(request, context.project_id, CapsuleKind.CAPSULE)


async def show_cached(request: web.Request, scope: str | None, kind: CapsuleKind) -> web.Response:
    """The capsule (or single container) that the request names in ``scope``, as a show returns
    it, from the body cache while its version holds: a client polling a capsule that has not
    changed costs one small query, not a load and an encoding of the capsule.

    The answer carries an ETag. A request whose ``If-None-Match`` names the current one gets 304
    Not Modified; with ``Prefer: wait=N`` too, it waits up to N seconds (api.max_wait at most)
    for the capsule to change (see capsa.api.watch). With ``until-status=A|B`` in ``Prefer``
    as well, it is answered only once the capsule has one of those statuses (at a change from
    the version it names, if it names the current one) or is gone, or when the wait ends: then
    with 304 only if it names the current version."""
    store = request.app[STORE]
    ident = request.match_info["ident"]

    async def current() -> tuple[str, CapsuleState]:
        return await _in_reach(
            request[CONTEXT],
            ident,
            scope,
            kind,
            lambda project_id: store.capsules.find_state(ident, project_id, kind),
        )

    watch = request.app[CAPSULE_WATCH]
    mark = watch.mark()
    capsule_uuid, state = await current()
    view = formatter(request)
    etag = _etag(view, kind, state.version)
    unchanged = _seen(request, etag)
    wait = preferred_wait(request, request.app[CONFIG].api.max_wait)
    into = preferred_statuses(request) if wait else None
    if unchanged or (into is not None and state.status not in into):
        if wait:
            # A client that saw an older version than this one waits only for the statuses.
            seen = state.version if unchanged else None
            changed = await watch.changed(capsule_uuid, seen, wait, into, since=mark)
            if changed is None:
                # Gone (404), or the wait ended: whatever the capsule is now.
                capsule_uuid, changed = await current()
            state = changed
            etag = _etag(view, kind, state.version)
            unchanged = _seen(request, etag)
        if unchanged:
            return _not_modified(etag, wait, into)
    version = state.version
    # A single container's body is not its capsule's: a shape of its own. A capsule's is the
    # list's, so that a list and a show share their bodies.
    shape = view.shape if kind is CapsuleKind.CAPSULE else (view.shape, kind)
    bodies = request.app[CAPSULE_BODIES]
    body = bodies.get(shape, capsule_uuid, version)
    if body is None:
        # Loaded after its version was read: a change in between makes the body newer than the
        # version it is kept under, which costs the next look a miss, never a stale body.
        capsule = await store.capsules.get(capsule_uuid)
        if capsule is None:
            raise _not_found(kind, ident)  # deleted since its version was read
        body = _shown(view, kind, capsule)
        bodies.put(shape, capsule_uuid, version, body)
    response = encoded_response(body)
    response.etag = etag
    return response


def _etag(view: CapsuleFormatter, kind: CapsuleKind, version: str) -> str:
    """Changes with the capsule and with what the caller's request makes of it; the same in
    every API process (written from the shape, not hashed as Python hashes sets)."""
    base_url, legacy, hidden = view.shape
    described = f"{base_url}|{int(legacy)}|{','.join(sorted(hidden))}|{kind.value}|{version}"
    return hashlib.blake2b(described.encode(), digest_size=12).hexdigest()


def _seen(request: web.Request, etag: str) -> bool:
    """Whether the request's If-None-Match names ``etag`` (or is ``*``)."""
    return any(tag.value in (etag, ETAG_ANY) for tag in request.if_none_match or ())


def _not_modified(etag: str, waited: float, into: frozenset[Status] | None) -> web.Response:
    response = web.Response(status=304)
    response.etag = etag
    if waited:
        applied = f"wait={waited:g}"
        if into is not None:
            applied += f", until-status={'|'.join(sorted(into))}"
        response.headers["Preference-Applied"] = applied
    return response


async def delete_capsule(request: web.Request) -> web.Response:
    context = request[CONTEXT]
    context.authorize("capsule_delete")
    store = request.app[STORE]
    all_projects = boolean(request.query, "all_projects", False)
    scope = context.project_scope(all_projects, "capsule:delete_all_projects")
    ident = request.match_info["ident"]
    # Found and marked in one transaction: no load of the capsule, one round trip.
    capsule_uuid, project_id = await _in_reach(
        context,
        ident,
        scope,
        CapsuleKind.CAPSULE,
        lambda project_id: store.capsules.find_and_request_delete(ident, project_id),
    )
    log.info("capsule deletion requested", capsule=capsule_uuid, project=project_id)
    return web.Response(status=204)


async def find_capsule(
    store: Store,
    context: RequestContext,
    ident: str,
    scope: str | None,
    kind: CapsuleKind = CapsuleKind.CAPSULE,
) -> Capsule:
    """The capsule (or single container, by ``kind``) named by uuid or name in ``scope``; those
    who may reach every project (admins) also find other projects' by name or uuid, as in Zun."""
    return await _in_reach(
        context, ident, scope, kind, lambda project_id: store.capsules.find(ident, project_id, kind)
    )


async def _in_reach(
    context: RequestContext,
    ident: str,
    scope: str | None,
    kind: CapsuleKind,
    lookup: Callable[[str | None], Awaitable[T | None]],
) -> T:
    """What ``lookup`` finds of the capsule ``ident`` in ``scope``, else (for those who may reach
    every project) in any project; Zun's 404 when neither has it, its 409 for an ambiguous name."""
    reach_all = context.can("capsule_all_projects")
    scopes = [scope, None] if scope is not None and reach_all else [scope]
    for project_id in scopes:
        try:
            found = await lookup(project_id)
        except AmbiguousName:
            raise Conflict(
                f"Multiple {kind}s exist with name {ident}. Please use the {kind} uuid instead."
            ) from None
        if found is not None:
            return found
    raise _not_found(kind, ident)


def _not_found(kind: CapsuleKind, ident: str) -> CapsuleNotFound | ContainerNotFound:
    return CapsuleNotFound(ident) if kind is CapsuleKind.CAPSULE else ContainerNotFound(ident)


async def authorize_fields(store: Store, context: RequestContext, spec: CapsuleSpec) -> None:
    """Zun's per-field rules: naming a runtime, a pull policy other than the default, or
    privileged containers, which also need the project to be allowed them."""
    if spec.runtime is not None:
        context.authorize("capsule_runtime", f"{spec.kind}:create:runtime")
    containers = (*spec.init_containers, *spec.containers)
    if any(c.image_pull_policy is not PullPolicy.IF_NOT_PRESENT for c in containers):
        context.authorize("capsule_image_pull_policy", f"{spec.kind}:create:image_pull_policy")
    if spec.privileged:
        action = f"{spec.kind}:create:privileged"
        context.authorize("capsule_privileged", action)
        if not await store.privileged.allowed(context.project_id):
            raise PolicyNotAuthorized(
                f"Policy doesn't allow {action} to be performed: project {context.project_id} "
                "may not run privileged containers (an admin allows it with `capsa project set "
                f"{context.project_id} --allow-privileged`)."
            )


def new_capsule(capsule_uuid: str, spec: CapsuleSpec, context: RequestContext) -> Capsule:
    """The records of a new capsule of ``spec``; a single container's container has the uuid of
    its capsule, so that the container's uuid is one in every path (logs included)."""

    def containers(
        kind: ContainerKind, first: int, specs: tuple[ContainerSpec, ...]
    ) -> list[Container]:
        return [
            Container(
                uuid=capsule_uuid if spec.kind is CapsuleKind.CONTAINER else str(uuid.uuid4()),
                capsule_uuid=capsule_uuid,
                project_id=context.project_id,
                user_id=context.user_id,
                kind=kind,
                position=position,
                spec=container_spec,
            )
            for position, container_spec in enumerate(specs, start=first)
        ]

    capsule = Capsule(
        uuid=capsule_uuid, project_id=context.project_id, user_id=context.user_id, spec=spec
    )
    # Positions run across the capsule: init containers first, in their order.
    capsule.init_containers = containers(ContainerKind.INIT, 0, spec.init_containers)
    capsule.containers = containers(ContainerKind.APP, len(spec.init_containers), spec.containers)
    return capsule


def next_url(
    base_url: str,
    page: Page,
    uuids: Sequence[str],
    all_projects: bool,
    collection: str = "capsules",
    filters: tuple[tuple[str, str], ...] = (),
) -> str | None:
    """Zun's ``next`` of a list of ``collection``: the same query (``filters`` included) from
    after the page's last item, when the page was full."""
    if not uuids or len(uuids) < page.limit:
        return None
    params = [*filters, ("sort_key", page.sort_key), ("sort_dir", page.sort_dir)]
    if all_projects:
        params.append(("all_projects", "true"))
    params += [("limit", str(page.limit)), ("marker", uuids[-1])]
    return f"{base_url}/v1/{collection}/?{urlencode(params)}"
