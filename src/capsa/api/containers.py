"""``/v1/containers``: Zun's container list, and the logs of a capsule's container.

The list answers Zun's shape for Zun's content: it lists standalone containers (``zun run``), and
Zun keeps a capsule's containers out of it (they are reached through their capsule). capsa runs
capsules only, so the list holds no container; ``openstack appcontainer list`` and ``zun list``
work and show that, with Zun's policy (``all_projects`` for admins).

The logs come from the host: the API never reads runtime state itself, it asks the agent of the
host that runs the capsule (see agent_client for the contract). Zun answers the logs as a JSON
string; ``follow=true`` is capsa's extension (for ``capsa logs --follow``) and streams text/plain
until the container stops or the client goes away.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime

from aiohttp import web

from capsa.api.agent_client import LogOptions
from capsa.api.errors import ContainerHostNotUp, ContainerNotFound, InvalidState, InvalidValue
from capsa.api.keys import AGENTS, CONFIG, STORE
from capsa.api.middleware import CONTEXT
from capsa.api.params import boolean, positive_limit, refuse_unknown
from capsa.api.views import json_response
from capsa.log import get_logger

log = get_logger(__name__)

_LOG_PARAMETERS = frozenset({"stdout", "stderr", "timestamps", "tail", "since", "follow"})
# Zun's forms of ``since``: seconds since the epoch, or a UTC time with optional milliseconds.
_SINCE_TIME = re.compile(r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})(?:,(\d{1,3}))?")


async def list_containers(request: web.Request) -> web.Response:
    context = request[CONTEXT]
    context.authorize("container_get", "container:get_all")
    query = request.query
    context.project_scope(boolean(query, "all_projects", False), "container:get_all_all_projects")
    positive_limit(query.get("limit"), request.app[CONFIG].api.max_limit)
    return json_response({"containers": [], "next": None})


async def container_logs(request: web.Request) -> web.StreamResponse:
    context = request[CONTEXT]
    context.authorize("container_get", "container:logs")
    store = request.app[STORE]
    options = log_options(request.query)
    container_uuid = request.match_info["container_uuid"]
    scope = None if context.can("capsule_all_projects") else context.project_id
    found = await store.capsules.find_container(container_uuid, scope)
    if found is None:
        raise ContainerNotFound(container_uuid)
    capsule, container = found
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
