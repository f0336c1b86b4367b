"""``GET /`` (which API versions exist) and ``GET /v1`` (what version 1 offers), as Zun answers.

Clients read ``GET /`` first, without authentication, and use min(1.40, max_version).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from capsa.api.keys import CONFIG
from capsa.api.microversion import MAX_VERSION, MIN_VERSION
from capsa.api.views import json_response

# The collections of v1 that capsa serves.
_COLLECTIONS = ("capsules", "containers", "hosts", "quotas", "quota_classes", "registries")


def _version(base_url: str) -> dict[str, Any]:
    return {
        "id": "v1",
        "status": "CURRENT",
        "min_version": str(MIN_VERSION),
        "max_version": str(MAX_VERSION),
        "links": [{"href": f"{base_url}/v1/", "rel": "self"}],
    }


async def root(request: web.Request) -> web.Response:
    base_url = request.app[CONFIG].api_url
    return json_response(
        {
            "name": "capsa",
            "description": "Pods as a service, through OpenStack Zun's container API.",
            "versions": [_version(base_url)],
            "default_version": _version(base_url),
        }
    )


async def v1(request: web.Request) -> web.Response:
    base_url = request.app[CONFIG].api_url
    document: dict[str, Any] = {
        "id": "v1",
        "media_types": [
            {"base": "application/json", "type": "application/vnd.openstack.zun.v1+json"}
        ],
        "links": [{"href": f"{base_url}/v1/", "rel": "self"}],
    }
    for collection in _COLLECTIONS:
        document[collection] = [
            {"href": f"{base_url}/v1/{collection}/", "rel": "self"},
            {"href": f"{base_url}/{collection}/", "rel": "bookmark"},
        ]
    return json_response(document)
