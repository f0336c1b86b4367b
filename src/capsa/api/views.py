"""Capsules, containers and hosts as Zun's clients read them.

The shapes follow Zun's views and what python-zunclient, gophercloud and Virtual Kubelet decode:
timestamps are naive UTC ``"YYYY-MM-DD HH:MM:SS"``, ``memory`` is a string of MiB, ``cpu`` a number
of cores, ``restart_policy`` a map of strings. From microversion 1.32 capsules carry ``name``,
``labels`` and ``restart_policy`` as a map; below it, Zun's legacy ``meta_name``, ``meta_labels``
and a bare restart policy name. Zun's admin-only fields (``host``, and the containers' ``runtime``,
``image_pull_policy`` and ``privileged``) are left out for callers whom the policy rule of the field
does not allow (:data:`FIELD_RULES`).

A list page formats up to ``api.max_limit`` capsules, so the formatter computes what is the same
for every row once and does no lookups per row.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

from capsa.api.microversion import CAPSULE_CURRENT_SHAPE, APIVersion
from capsa.model.capsule import Address, Capsule, Container, RestartPolicy, Status
from capsa.model.host import Host
from capsa.model.network import SECURITY_GROUPS_ANNOTATION


def json_response(
    data: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A compact JSON response; orjson encodes a full list page several times faster than json."""
    return encoded_response(orjson.dumps(data), status=status, headers=headers)


def encoded_response(
    body: bytes, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A response of JSON encoded already (a body kept in the body cache)."""
    return web.Response(body=body, status=status, headers=headers, content_type="application/json")


def encoded_list_response(
    collection: str, items: list[bytes], next_url: str | None
) -> web.Response:
    """Zun's list body ``{collection: [...], "next": ...}`` from items encoded already."""
    body = b"".join(
        (
            b'{"',
            collection.encode(),
            b'":[',
            b",".join(items),
            b'],"next":',
            orjson.dumps(next_url),
            b"}",
        )
    )
    return encoded_response(body)


def timestamp(value: datetime | None) -> str | None:
    return value.isoformat(" ", "seconds") if value else None


def links(base_url: str, collection: str, ident: str) -> list[dict[str, str]]:
    return [
        {"href": f"{base_url}/v1/{collection}/{ident}", "rel": "self"},
        {"href": f"{base_url}/{collection}/{ident}", "rel": "bookmark"},
    ]


def restart_policy(policy: RestartPolicy) -> dict[str, str]:
    return {"Name": policy.value, "MaximumRetryCount": "0"}


def addresses(items: list[Address]) -> dict[str, list[dict[str, Any]]]:
    by_network: dict[str, list[dict[str, Any]]] = {}
    for address in items:
        by_network.setdefault(address.network_id, []).append(
            {
                "addr": address.ip,
                "version": address.version,
                "port": address.port_id,
                "subnet_id": address.subnet_id,
                "preserve_on_delete": False,
            }
        )
    return by_network


def status_detail(container: Container) -> str | None:
    """A short account of the container's process, like the runtime's own status line."""
    if container.status is Status.RUNNING and container.started_at:
        detail = f"Up since {timestamp(container.started_at)}"
    elif container.exit_code is not None:
        detail = f"Exited ({container.exit_code})"
        if container.finished_at:
            detail += f" at {timestamp(container.finished_at)}"
    else:
        return None
    if container.restart_count:
        detail += f", restarted {container.restart_count} times"
    return detail


# Init containers restart until they succeed whenever the capsule restarts at all, as in Zun.
_INIT_RESTART = {
    RestartPolicy.ALWAYS: restart_policy(RestartPolicy.ON_FAILURE),
    RestartPolicy.ON_FAILURE: restart_policy(RestartPolicy.ON_FAILURE),
    RestartPolicy.NEVER: restart_policy(RestartPolicy.NEVER),
}


# The fields Zun shows to admins only, and the capsa.api.policy rule that shows each.
FIELD_RULES = {
    "host": "capsule_host",
    "runtime": "capsule_runtime",
    "image_pull_policy": "capsule_image_pull_policy",
    "privileged": "capsule_privileged",
}


class CapsuleFormatter:
    """Formats capsules for one request: its base URL, microversion and the fields of
    :data:`FIELD_RULES` that the caller may not see."""

    def __init__(self, base_url: str, version: APIVersion, hidden: frozenset[str]) -> None:
        self._base_url = base_url
        self._legacy = version < CAPSULE_CURRENT_SHAPE
        self._hidden = hidden
        # Everything the body of a capsule depends on besides the capsule.
        self.shape = (base_url, self._legacy, hidden)

    def capsule(self, capsule: Capsule) -> dict[str, Any]:
        spec = capsule.spec
        policy = restart_policy(spec.restart_policy)
        capsule_addresses = addresses(capsule.addresses)
        body: dict[str, Any] = {
            "uuid": capsule.uuid,
            "links": links(self._base_url, "capsules", capsule.uuid),
            "user_id": capsule.user_id,
            "project_id": capsule.project_id,
            "created_at": timestamp(capsule.created_at),
            "updated_at": timestamp(capsule.updated_at),
            "status": capsule.status,
            "status_reason": capsule.status_reason,
            "task_state": capsule.task_state,
            "annotations": spec.annotations,
            "cpu": spec.cpu_millis / 1000,
            "memory": str(spec.memory_mb),
            "addresses": capsule_addresses,
            "containers": [
                self._container(c, capsule, policy, capsule_addresses) for c in capsule.containers
            ],
            "init_containers": [
                self._container(c, capsule, _INIT_RESTART[spec.restart_policy], capsule_addresses)
                for c in capsule.init_containers
            ],
        }
        if self._legacy:
            body["meta_name"] = spec.name
            body["meta_labels"] = spec.labels
            body["restart_policy"] = policy["Name"]
            body["capsule_version"] = ""
            body["volumes_info"] = {}
            body["containers_uuids"] = [c.uuid for c in capsule.containers]
            body["init_containers_uuids"] = [c.uuid for c in capsule.init_containers]
        else:
            body["name"] = spec.name
            body["labels"] = spec.labels
            body["restart_policy"] = policy
        if "host" not in self._hidden:
            body["host"] = capsule.host
        return body

    def _container(
        self,
        container: Container,
        capsule: Capsule,
        policy: dict[str, str],
        capsule_addresses: dict[str, list[dict[str, Any]]],
    ) -> dict[str, Any]:
        spec = container.spec
        body: dict[str, Any] = {
            "uuid": container.uuid,
            "user_id": container.user_id,
            "project_id": container.project_id,
            "name": spec.name,
            "image": spec.image,
            # Zun runs a capsule container's command followed by its args.
            "command": [*spec.command, *spec.args],
            "entrypoint": None,
            "status": container.status,
            "status_reason": container.status_reason,
            "status_detail": status_detail(container),
            "task_state": container.task_state,
            "cpu": spec.cpu_millis / 1000,
            "memory": str(spec.memory_mb),
            "environment": spec.env,
            "workdir": spec.workdir,
            "ports": [port.container_port for port in spec.ports],
            "hostname": None,
            "labels": {},
            # Containers share their capsule's network namespace, hence its addresses.
            "addresses": capsule_addresses,
            "image_pull_policy": spec.image_pull_policy.lower(),
            "restart_policy": policy,
            "interactive": spec.stdin,
            "tty": spec.tty,
            "image_driver": None,
            "security_groups": [],
            "auto_remove": False,
            "auto_heal": False,
            "privileged": spec.privileged,
            "runtime": capsule.spec.runtime,
            "disk": 0,
            "healthcheck": {},
            "cpu_policy": "shared",
            "registry_id": spec.registry_id,
            "created_at": timestamp(container.created_at),
            "updated_at": timestamp(container.updated_at),
        }
        body["host"] = capsule.host
        for field in self._hidden:
            del body[field]
        return body

    def single_container(self, capsule: Capsule) -> dict[str, Any]:
        """A capsule of kind container as Zun's container: the container's fields, with the
        status, task_state and settings of its capsule."""
        spec = capsule.spec
        (container,) = capsule.containers
        body = self._container(
            container, capsule, restart_policy(spec.restart_policy), addresses(capsule.addresses)
        )
        body["restart_policy"]["MaximumRetryCount"] = str(spec.max_retries)
        groups = spec.annotations.get(SECURITY_GROUPS_ANNOTATION, "")
        body.update(
            links=links(self._base_url, "containers", capsule.uuid),
            name=spec.name,
            status=capsule.status,
            status_reason=capsule.status_reason or container.status_reason,
            task_state=capsule.task_state,
            # Docker's command is the CRI args, Docker's entrypoint the CRI command.
            command=list(container.spec.args),
            entrypoint=list(container.spec.command) or None,
            hostname=spec.sandbox_hostname,
            labels=spec.labels,
            security_groups=[g for g in groups.split(",") if g],
            auto_remove=spec.auto_remove,
            updated_at=timestamp(capsule.updated_at),
        )
        return body


def format_host(host: Host, base_url: str) -> dict[str, Any]:
    return {
        "uuid": host.uuid,
        "links": links(base_url, "hosts", host.uuid),
        "hostname": host.name,
        "cpus": host.cpu_millis / 1000,
        "cpu_used": host.cpu_millis_used / 1000,
        "mem_total": host.memory_mb,
        "mem_used": host.memory_mb_used,
        "runtimes": list(host.runtimes),
        "labels": {},
        "os_type": "linux",
        "disabled": host.disabled,
        "heartbeat_at": timestamp(host.heartbeat_at),
    }
