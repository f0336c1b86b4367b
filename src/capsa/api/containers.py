"""``/v1/containers``: Zun's single containers, and the logs of any container.

A single container runs the way Zun's CRI integration runs one: a pod sandbox holding that one
container. It is a capsule of kind ``container`` (capsa.model.capsule.CapsuleKind) with one
container whose uuid is the capsule's, so it takes the capsule path end to end (store, quotas,
scheduler, agent, port, CNI, logs). ``/v1/capsules`` never shows it, and, as in Zun, a capsule's
containers stay out of ``/v1/containers``.

Every action is desired state that the host's agent carries out (capsa.store.capsules.Action):
``run=true`` or ``start`` asks for the container running, a create without ``run`` or ``stop``
asks for it created but not running, ``reboot`` raises its generation (the agent replaces a
container of an older generation), ``kill`` leaves a signal for the agent to send. Each is
refused (409) in the statuses Zun refuses it in, and answered 202 as in Zun. What CRI cannot do
(pause, exec, attach, commit, archives...) answers 501 with the reason.

The logs come from the host: the API never reads runtime state itself, it asks the agent of the
host that runs the capsule (see agent_client for the contract). Zun answers the logs as a JSON
string; ``follow=true`` is capsa's extension (for ``capsa logs --follow``) and streams text/plain
until the container stops or the client goes away.
"""

from __future__ import annotations

import re
import signal
import uuid
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime

from aiohttp import web

from capsa.api.agent_client import LogOptions
from capsa.api.capsules import (
    DEFAULT_SORT_KEY,
    SORT_DIRS,
    accepted,
    authorize_fields,
    find_capsule,
    formatter,
    new_capsule,
    next_url,
    show_cached,
    store_new,
)
from capsa.api.context import RequestContext
from capsa.api.errors import (
    Conflict,
    ContainerAlreadyExists,
    ContainerHostNotUp,
    ContainerNotFound,
    InvalidState,
    InvalidValue,
    OperationNotSupported,
)
from capsa.api.keys import AGENTS, CONFIG, STORE, TEMPLATE_DEFAULTS
from capsa.api.microversion import APIVersion
from capsa.api.middleware import CONTEXT
from capsa.api.params import boolean, one_of, positive_limit, read_json, refuse_unknown
from capsa.api.schemas.container import parse_container_body
from capsa.api.schemas.template import TemplateError
from capsa.api.views import json_response
from capsa.log import get_logger
from capsa.model.capsule import Capsule, CapsuleKind, DesiredState, Status, TaskState
from capsa.model.network import NETWORK_ANNOTATION, SECURITY_GROUPS_ANNOTATION
from capsa.model.registry import RegistryDirectory
from capsa.store import Store
from capsa.store.capsules import SORT_KEYS, Action, ListFilters, NameConflict, WrongState
from capsa.store.networks import Ambiguous, NotFound, RepeatedNetwork
from capsa.store.paging import MarkerNotFound, Page

log = get_logger(__name__)

_LOG_PARAMETERS = frozenset({"stdout", "stderr", "timestamps", "tail", "since", "follow"})
# Zun's forms of ``since``: seconds since the epoch, or a UTC time with optional milliseconds.
_SINCE_TIME = re.compile(r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})(?:,(\d{1,3}))?")

_FILTERS = ("name", "image", "project_id", "user_id", "memory", "host", "task_state", "status")
_LIST_PARAMETERS = frozenset(
    {"all_projects", "limit", "marker", "sort_key", "sort_dir", "auto_remove", *_FILTERS}
)
# Zun sorts by its row id unless told otherwise: creation order.
_SORT_KEYS = {**{key: key for key in SORT_KEYS}, "id": DEFAULT_SORT_KEY}
_FORCE_SINCE = APIVersion(1, 7)
_STOP_SINCE = APIVersion(1, 12)
_NO_RENAME_SINCE = APIVersion(1, 14)

# The statuses Zun allows each action in (zun.common.utils.VALID_STATES).
_DELETABLE = frozenset({Status.CREATED, Status.ERROR, Status.STOPPED})
_DELETABLE_AFTER_STOP = _DELETABLE | {Status.RUNNING}
_START = Action(
    allowed=frozenset({Status.CREATED, Status.STOPPED, Status.ERROR}),
    task_state=TaskState.CONTAINER_STARTING,
    desired_state=DesiredState.RUNNING,
    new_generation=True,
)
_RUNNING = frozenset({Status.RUNNING})
_REBOOTABLE = frozenset({Status.CREATED, Status.RUNNING, Status.STOPPED, Status.ERROR})

# Zun's actions that CRI offers no way to carry out, and why.
_UNSUPPORTED = {
    "pause": "CRI cannot pause (freeze) a container",
    "unpause": "CRI cannot pause (freeze) a container",
    "execute": "commands in a container (exec) are not supported yet",
    "execute_resize": "commands in a container (exec) are not supported yet",
    "attach": "attaching to a container over a websocket is not supported",
    "resize": "attaching to a container (and so resizing its tty) is not supported",
    "top": "listing a container's processes is not supported yet",
    "stats": "a container's statistics are not served yet",
    "commit": "CRI cannot commit a container into an image",
    "get_archive": "copying files out of a container is not supported",
    "put_archive": "copying files into a container is not supported",
    "rebuild": "rebuilding a container is not supported: delete it and run it again",
    "resize_container": "changing a container's cpu and memory is not supported yet",
    "network_attach": "a container stays on the network it was created on",
    "network_detach": "a container stays on the network it was created on",
    "network_list": "a container's networks are its addresses (GET the container)",
    "add_security_group": "a container keeps the security groups it was created with",
    "remove_security_group": "a container keeps the security groups it was created with",
    "container_actions": "the record of a container's actions is not kept",
}


async def create_container(request: web.Request) -> web.Response:
    context = request[CONTEXT]
    context.authorize("container_create", "container:create")
    refuse_unknown(request.query, frozenset({"run"}))
    run = boolean(request.query, "run", False)
    config = request.app[CONFIG]
    body = await read_json(request, config.api.max_body_bytes)
    store = request.app[STORE]
    registries = RegistryDirectory(tuple(await store.registries.of_project(context.project_id)))
    container_uuid = str(uuid.uuid4())
    try:
        asked = parse_container_body(
            body,
            context.version,
            request.app[TEMPLATE_DEFAULTS],
            fallback_name=f"container-{container_uuid[:13]}",
            registries=registries,
        )
    except TemplateError as exc:
        raise InvalidValue(f"Invalid container: {exc}") from None
    spec = replace(
        asked.spec,
        annotations=await _attachment(
            store, context.project_id, asked.networks, asked.security_groups
        ),
    )
    await authorize_fields(store, context, spec)
    capsule = new_capsule(container_uuid, spec, context)
    capsule.desired_state = DesiredState.RUNNING if run else DesiredState.STOPPED
    version = await store_new(request, capsule, run=run)
    return accepted(request, capsule, version)


async def _attachment(
    store: Store, project_id: str, networks: tuple[str, ...], security_groups: tuple[str, ...]
) -> dict[str, str]:
    """The annotations that attach the container (capsa.model.network.Attachment), naming the
    networks and groups by id; Zun's errors for a name the project cannot use."""
    annotations = {}
    try:
        if networks:
            found = await store.networks.resolve_networks(project_id, networks)
            annotations[NETWORK_ANNOTATION] = ",".join(n.id for n in found)
        if security_groups:
            ids = await store.networks.resolve_security_groups(project_id, security_groups)
            annotations[SECURITY_GROUPS_ANNOTATION] = ",".join(dict.fromkeys(ids))
    except (NotFound, RepeatedNetwork) as exc:
        raise InvalidValue(f"Invalid container: {exc}") from None
    except Ambiguous as exc:
        raise Conflict(f"{exc}; use an ID to be more specific.") from None
    return annotations


async def list_containers(request: web.Request) -> web.Response:
    context = request[CONTEXT]
    context.authorize("container_get", "container:get_all")
    config = request.app[CONFIG]
    query = request.query
    refuse_unknown(query, _LIST_PARAMETERS)
    all_projects = boolean(query, "all_projects", False)
    scope = context.project_scope(all_projects, "container:get_all_all_projects")
    if "host" in query:
        context.authorize("capsule_host", "container:get_one:host")
    page = Page(
        limit=positive_limit(query.get("limit"), config.api.max_limit),
        marker=query.get("marker") or None,
        sort_key=_SORT_KEYS[one_of(query, "sort_key", tuple(_SORT_KEYS), "id")],
        sort_dir=one_of(query, "sort_dir", SORT_DIRS, "asc"),
    )
    wanted_project = query.get("project_id")
    containers: list[Capsule] = []
    if wanted_project is None or scope in (None, wanted_project):
        try:
            containers = await request.app[STORE].capsules.list_page(
                wanted_project or scope, page, CapsuleKind.CONTAINER, _filters(query)
            )
        except MarkerNotFound as exc:
            raise InvalidValue(f"Invalid marker: {exc}") from None
    view = formatter(request)
    given = tuple((key, query[key]) for key in (*_FILTERS, "auto_remove") if key in query)
    return json_response(
        {
            "containers": [view.single_container(c) for c in containers],
            "next": next_url(
                config.api_url,
                page,
                [c.uuid for c in containers],
                all_projects,
                "containers",
                given,
            ),
        }
    )


def _filters(query: Mapping[str, str]) -> ListFilters:
    memory = query.get("memory")
    if memory is not None and not memory.isdigit():
        raise InvalidValue(f"Invalid memory {memory!r}: a number of MiB")
    return ListFilters(
        name=query.get("name"),
        image=query.get("image"),
        user_id=query.get("user_id"),
        memory_mb=int(memory) if memory is not None else None,
        host=query.get("host"),
        task_state=query.get("task_state"),
        status=query.get("status"),
        auto_remove=boolean(query, "auto_remove", False) if "auto_remove" in query else None,
    )


async def show_container(request: web.Request) -> web.Response:
    context = request[CONTEXT]
    context.authorize("container_get", "container:get_one")
    refuse_unknown(request.query, frozenset({"all_projects"}))
    scope = context.project_scope(
        boolean(request.query, "all_projects", False), "container:get_one_all_projects"
    )
    return await show_cached(request, scope, CapsuleKind.CONTAINER)


async def delete_container(request: web.Request) -> web.Response:
    context = request[CONTEXT]
    context.authorize("container_delete", "container:delete")
    query = request.query
    refuse_unknown(query, frozenset({"force", "stop", "all_projects"}))
    scope = context.project_scope(
        boolean(query, "all_projects", False), "container:delete_all_projects"
    )
    container = await _find(request, scope)
    force = boolean(query, "force", False)
    stop = boolean(query, "stop", False)
    if stop:
        _version_check(context, "stop", _STOP_SINCE)
        _check_state(container, "delete_after_stop", _DELETABLE_AFTER_STOP)
        if container.status is Status.RUNNING:
            context.authorize("container_action", "container:stop")
    elif force:
        _version_check(context, "force", _FORCE_SINCE)
        context.authorize("container_delete_force", "container:delete_force")
    else:
        _check_state(container, "delete", _DELETABLE)
    # The agent stops what runs (within agent.stop_grace_period) before it removes anything.
    await request.app[STORE].capsules.request_delete(container.uuid)
    log.info(
        "container deletion requested",
        container=container.uuid,
        project=container.project_id,
        user=context.user_id,
        force=force,
        stop=stop,
    )
    return web.Response(status=204)


async def start_container(request: web.Request) -> web.Response:
    return await _act(request, "start", _START)


async def stop_container(request: web.Request) -> web.Response:
    refuse_unknown(request.query, frozenset({"timeout"}))
    action = Action(
        allowed=_RUNNING,
        task_state=TaskState.CONTAINER_STOPPING,
        desired_state=DesiredState.STOPPED,
        stop_timeout=_timeout(request.query),
    )
    return await _act(request, "stop", action)


async def reboot_container(request: web.Request) -> web.Response:
    refuse_unknown(request.query, frozenset({"timeout"}))
    action = Action(
        allowed=_REBOOTABLE,
        task_state=TaskState.CONTAINER_REBOOTING,
        desired_state=DesiredState.RUNNING,
        new_generation=True,
        status=Status.RESTARTING,
        stop_timeout=_timeout(request.query),
    )
    return await _act(request, "reboot", action)


async def kill_container(request: web.Request) -> web.Response:
    refuse_unknown(request.query, frozenset({"signal"}))
    action = Action(
        allowed=_RUNNING,
        task_state=TaskState.CONTAINER_KILLING,
        pending_signal=_signal(request.query.get("signal")),
    )
    return await _act(request, "kill", action)


async def _act(request: web.Request, name: str, action: Action) -> web.Response:
    context = request[CONTEXT]
    context.authorize("container_action", f"container:{name}")
    container = await _find(request, context.project_id)
    try:
        await request.app[STORE].capsules.request_action(container.uuid, action)
    except WrongState as exc:
        raise _wrong_state(container, name, exc.status) from None
    log.info(
        f"container {name} requested",
        container=container.uuid,
        project=container.project_id,
        user=context.user_id,
    )
    return web.Response(status=202)


async def rename_container(request: web.Request) -> web.Response:
    """Zun's rename below 1.14 (``POST .../rename?name=``); PATCH from 1.14 on."""
    context = request[CONTEXT]
    if context.version >= _NO_RENAME_SINCE:
        raise OperationNotSupported(
            f"rename was removed in microversion {_NO_RENAME_SINCE}: PATCH the container with "
            '{"name": NEW-NAME}'
        )
    refuse_unknown(request.query, frozenset({"name"}))
    if "name" not in request.query:
        raise InvalidValue("rename needs the new name: ?name=NEW-NAME")
    return await _rename(request, request.query["name"])


async def update_container(request: web.Request) -> web.Response:
    body = await read_json(request, request.app[CONFIG].api.max_body_bytes)
    if not isinstance(body, dict) or not body:
        raise InvalidValue('The update must be a JSON object such as {"name": "new-name"}.')
    unknown = sorted(set(body) - {"name", "cpu", "memory", "auto_heal"})
    if unknown:
        raise InvalidValue(
            f"Unknown field(s) {', '.join(unknown)}: a container's name, cpu and memory can be "
            "updated"
        )
    unsupported = sorted(set(body) - {"name"})
    if unsupported:
        request[CONTEXT].authorize("container_update", "container:update")
        raise OperationNotSupported(
            f"Updating {', '.join(unsupported)} is not supported yet: only the name can change."
        )
    name = body["name"]
    if not isinstance(name, str):
        raise InvalidValue("name must be a string")
    return await _rename(request, name)


async def _rename(request: web.Request, name: str) -> web.Response:
    context = request[CONTEXT]
    context.authorize("container_update", "container:update")
    if not _NAME.fullmatch(name) or len(name) > 255:
        raise InvalidValue(
            f"Invalid name {name!r}: at most 255 letters, digits, '_', '.' and '-', starting "
            "with a letter or a digit"
        )
    store = request.app[STORE]
    container = await _find(request, context.project_id)
    if container.name == name:
        raise Conflict("The new name for the container is the same as the old name.")
    try:
        await store.capsules.rename(container.uuid, name)
    except NameConflict:
        raise ContainerAlreadyExists(
            f"A container with name {name} already exists in project {container.project_id}."
        ) from None
    renamed = await store.capsules.get(container.uuid)
    if renamed is None:
        raise ContainerNotFound(container.uuid)
    return json_response(formatter(request).single_container(renamed))


async def unsupported_action(request: web.Request) -> web.Response:
    context = request[CONTEXT]
    action = request.match_info["action"]
    context.authorize("container_get", f"container:{action}")
    container = await _find(request, context.project_id)
    raise OperationNotSupported(
        f"Cannot {action} container {container.uuid}: {_UNSUPPORTED[action]}."
    )


async def _find(request: web.Request, scope: str | None) -> Capsule:
    context: RequestContext = request[CONTEXT]
    return await find_capsule(
        request.app[STORE], context, request.match_info["ident"], scope, CapsuleKind.CONTAINER
    )


def _check_state(container: Capsule, action: str, allowed: frozenset[Status]) -> None:
    if container.desired_state is DesiredState.DELETED:
        raise _wrong_state(container, action, Status.DELETING)
    if container.status not in allowed:
        raise _wrong_state(container, action, container.status)


def _wrong_state(container: Capsule, action: str, status: Status) -> InvalidState:
    return InvalidState(f"Cannot {action} container {container.uuid} in {status} state.")


def _version_check(context: RequestContext, param: str, since: APIVersion) -> None:
    if context.version < since:
        raise InvalidValue(
            f"Invalid param {param} because current request version is {context.version}. "
            f"{param} is only supported from version {since}"
        )


def _timeout(query: Mapping[str, str]) -> int | None:
    value = query.get("timeout")
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise InvalidValue(f"Invalid timeout {value!r}: a whole number of seconds (0 or more)")
    return int(value)


def _signal(value: str | None) -> str:
    """Zun's forms of a signal (KILL, SIGKILL, kill, sigkill, 9; none: SIGKILL) by its name."""
    if value is None or value in ("", "None"):
        return signal.SIGKILL.name
    if value.isdigit():
        try:
            return signal.Signals(int(value)).name
        except ValueError:
            pass
    name = value.upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    if name in signal.Signals.__members__:
        return name
    raise InvalidValue(f"Invalid signal {value!r}: a signal's name (KILL, SIGTERM...) or number")


_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")


async def container_logs(request: web.Request) -> web.StreamResponse:
    context = request[CONTEXT]
    context.authorize("container_get", "container:logs")
    store = request.app[STORE]
    options = log_options(request.query)
    ident = request.match_info["ident"]
    scope = None if context.can("capsule_all_projects") else context.project_id
    # A capsule's container by its uuid, or a single container by uuid or name.
    found = await store.capsules.find_container(ident, scope)
    if found is None:
        single = await _find(request, context.project_id)
        found = single, single.containers[0]
    capsule, container = found
    container_uuid = container.uuid
    if capsule.host is None:
        raise InvalidState(
            f"Cannot read the logs of container {container.spec.name} ({container_uuid}): its "
            f"capsule {capsule.name} is not on a host yet (status {capsule.status}, "
            f"task_state {capsule.task_state})."
        )
    # Hosts are for those who may see them, in errors too.
    name_host = context.can("capsule_host")
    host = await store.hosts.get(capsule.host)
    if host is None:
        where = f"Host {capsule.host}" if name_host else "The host"
        raise ContainerHostNotUp(
            f"{where} of capsule {capsule.name} is not registered; its agent is gone."
        )
    agents = request.app[AGENTS]
    if not options.follow:
        return json_response(await agents.logs(host, container_uuid, options, name_host))
    async with agents.stream_logs(host, container_uuid, options, name_host) as chunks:
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        try:
            async for chunk in chunks:
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:
            log.info("log follower went away", container=container_uuid)
    return response


def log_options(query: Mapping[str, str]) -> LogOptions:
    refuse_unknown(query, _LOG_PARAMETERS)
    options = LogOptions(
        stdout=boolean(query, "stdout", True),
        stderr=boolean(query, "stderr", True),
        timestamps=boolean(query, "timestamps", False),
        tail=_tail(query.get("tail", "all")),
        since=_since(query.get("since")),
        follow=boolean(query, "follow", False),
    )
    if not (options.stdout or options.stderr):
        raise InvalidValue("At least one of stdout and stderr must be true.")
    return options


def _tail(value: str) -> int | None:
    if value == "all":
        return None
    if not value.isdigit():
        raise InvalidValue(f"Invalid tail {value!r}: use 'all' or a number of lines (0 or more)")
    return int(value)


def _since(value: str | None) -> float | None:
    if value is None or value == "":
        return None
    if value.isdigit():
        return float(value)
    invalid = InvalidValue(
        f"Invalid since {value!r}: use seconds since the epoch or a UTC time "
        "'YYYY-MM-DD HH:MM:SS[,mmm]'"
    )
    match = _SINCE_TIME.fullmatch(value)
    if not match:
        raise invalid
    try:
        moment = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        raise invalid from None
    return moment.timestamp() + int((match.group(2) or "0").ljust(3, "0")) / 1000
