"""``/v1/hosts``: the hosts that run capsules, for admins, from microversion 1.4 as in Zun."""

from __future__ import annotations

from aiohttp import web

from capsa.api import microversion
from capsa.api.context import RequestContext
from capsa.api.errors import HostNotFound
from capsa.api.keys import CONFIG, STORE
from capsa.api.middleware import CONTEXT
from capsa.api.views import format_host, json_response


def _authorize(context: RequestContext, action: str) -> None:
    microversion.require(context.version, microversion.HOSTS_API)
    context.authorize("host_get", action)


async def list_hosts(request: web.Request) -> web.Response:
    _authorize(request[CONTEXT], "host:get_all")
    base_url = request.app[CONFIG].api_url
    hosts = await request.app[STORE].hosts.all()
    return json_response({"hosts": [format_host(h, base_url) for h in hosts], "next": None})


async def show_host(request: web.Request) -> web.Response:
    _authorize(request[CONTEXT], "host:get")
    ident = request.match_info["ident"]
    store = request.app[STORE]
    host = await store.hosts.get(ident)
    if host is None:
        host = next((h for h in await store.hosts.all() if h.uuid == ident), None)
    if host is None:
        raise HostNotFound(ident)
    return json_response(format_host(host, request.app[CONFIG].api_url))
