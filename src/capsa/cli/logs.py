"""``capsa logs CAPSULE [-c CONTAINER] [--follow] [--tail N] [--timestamps]``.

The container is named within its capsule (default: the capsule's first container); the API reads
the logs from the agent of the capsule's host. ``--follow`` streams until the container stops.
"""

from __future__ import annotations

import codecs
from typing import Any

from capsa.cli.capsules import capsule_path
from capsa.cli.client import ApiClient
from capsa.cli.errors import CliError, ExitCode
from capsa.cli.output import Output


def logs(
    client: ApiClient,
    out: Output,
    ident: str,
    container_name: str | None,
    follow: bool,
    tail: int | None,
    timestamps: bool,
) -> int:
    capsule = client.get(capsule_path(ident))
    container = pick_container(capsule, container_name)
    path = f"/v1/containers/{container['uuid']}/logs"
    query = {
        "stdout": "true",
        "stderr": "true",
        "timestamps": "true" if timestamps else "false",
        "tail": "all" if tail is None else str(tail),
    }
    if not follow:
        out.stdout.write(client.get(path, query))
        out.stdout.flush()
        return ExitCode.OK
    # Chunks may split a UTF-8 character; the incremental decoder keeps the pieces together.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with client.stream(path, {**query, "follow": "true"}) as chunks:
        for chunk in chunks:
            out.stdout.write(decoder.decode(chunk))
            out.stdout.flush()
    out.stdout.write(decoder.decode(b"", final=True))
    return ExitCode.OK


def pick_container(capsule: dict[str, Any], name: str | None) -> dict[str, Any]:
    containers: list[dict[str, Any]] = [
        *capsule.get("containers", []),
        *capsule.get("init_containers", []),
    ]
    if name is None:
        if not containers:
            raise CliError(f"capsule {capsule['name']} has no containers")
        return containers[0]
    for container in containers:
        if container["name"] == name:
            return container
    names = ", ".join(c["name"] for c in containers) or "none"
    raise CliError(
        f"capsule {capsule['name']} has no container named {name!r}; its containers: {names}",
        ExitCode.USAGE,
    )
