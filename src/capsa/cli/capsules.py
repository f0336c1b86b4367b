"""``capsa capsule create|list|show|delete``.

Templates are read as JSON; YAML works too when PyYAML can be imported (it is not a dependency of
capsa, and the standard library has no YAML parser), otherwise the command says how to convert.
``--wait`` follows the capsule and reports each change of its status, task state and containers
on stderr, so that a script can wait for Running (or for the capsule to be gone) and trust the
code. capsa's API holds each look until the capsule changes; another API is polled.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from capsa.cli.client import ApiClient, Observed
from capsa.cli.errors import CliError, ExitCode
from capsa.cli.output import CAPSULE_COLUMNS, Output, capsule_details, capsule_row, table
from capsa.model.network import NETWORK_ANNOTATION, SECURITY_GROUPS_ANNOTATION

POLL_INTERVAL = 0.5
# A capsule that reached one of these is done starting; Stopped means its containers completed.
_STARTED = frozenset({"Running", "Stopped"})
_FAILED = frozenset({"Error", "Deleting"})


def create(client: ApiClient, out: Output, template: Any, wait: bool, timeout: float) -> int:
    created = client.post("/v1/capsules", {"template": template})
    capsule = created.resource
    if not wait:
        out.result(capsule, capsule_details(capsule))
        return ExitCode.OK
    out.progress(f"capsule {capsule['name']} ({capsule['uuid']}) accepted; waiting for it to run")
    final = _poll(
        client,
        out,
        capsule["uuid"],
        timeout,
        until=lambda c: c is None or c["status"] in _STARTED | _FAILED,
        seen=created,
    )
    if final is None:
        raise CliError(f"capsule {capsule['name']} was deleted while it was starting")
    out.result(final, capsule_details(final))
    if final["status"] in _FAILED:
        raise CliError(
            f"capsule {final['name']} ended in {final['status']}: "
            f"{final.get('status_reason') or 'no reason given'}"
        )
    return ExitCode.OK


def list_all(client: ApiClient, out: Output) -> int:
    capsules: list[dict[str, Any]] = []
    path: str | None = "/v1/capsules"
    query: dict[str, str] | None = None
    while path:
        page = client.get(path, query)
        capsules += page["capsules"]
        # ``next`` is an absolute URL at the API's public address; follow it at ours.
        next_url = page.get("next")
        path, query = _path_and_query(next_url) if next_url else (None, None)
    out.result(capsules, table(CAPSULE_COLUMNS, [capsule_row(c) for c in capsules]))
    return ExitCode.OK


def show(client: ApiClient, out: Output, ident: str) -> int:
    capsule = client.get(capsule_path(ident))
    out.result(capsule, capsule_details(capsule))
    return ExitCode.OK


def delete(client: ApiClient, out: Output, ident: str, wait: bool, timeout: float) -> int:
    capsule = client.get(capsule_path(ident))
    client.delete(capsule_path(capsule["uuid"]))
    if wait:
        out.progress(f"deleting capsule {capsule['name']} ({capsule['uuid']})")
        _poll(client, out, capsule["uuid"], timeout, until=lambda c: c is None)
        message = f"capsule {capsule['name']} deleted"
    else:
        message = f"deletion of capsule {capsule['name']} requested"
    out.result({"uuid": capsule["uuid"], "name": capsule["name"], "deleted": wait}, message)
    return ExitCode.OK


def capsule_path(ident: str) -> str:
    return f"/v1/capsules/{quote(ident, safe='')}"


def with_attachment(template: Any, networks: list[str], security_groups: list[str]) -> Any:
    """The template with the networks and security groups to join set as its annotations (which
    a Zun template and a Pod manifest both keep in ``metadata.annotations``)."""
    if not networks and not security_groups:
        return template
    if not isinstance(template, dict):
        raise CliError("the template must be a JSON or YAML object", ExitCode.USAGE)
    metadata = template.setdefault("metadata", {})
    if not isinstance(metadata, dict):
        raise CliError("the template's metadata must be an object", ExitCode.USAGE)
    annotations = metadata.setdefault("annotations", {})
    if not isinstance(annotations, dict):
        raise CliError("the template's metadata.annotations must be an object", ExitCode.USAGE)
    if networks:
        annotations[NETWORK_ANNOTATION] = ",".join(networks)
    if security_groups:
        annotations[SECURITY_GROUPS_ANNOTATION] = ",".join(security_groups)
    return template


def read_template(file: str) -> Any:
    try:
        raw = sys.stdin.read() if file == "-" else Path(file).read_text()
    except OSError as exc:
        raise CliError(f"cannot read {file}: {exc.strerror or exc}", ExitCode.USAGE) from exc
    try:
        return json.loads(raw)
    except json.JSONDecodeError as json_error:
        return _read_yaml(file, raw, json_error)


def _read_yaml(file: str, raw: str, json_error: json.JSONDecodeError) -> Any:
    # Imported only here: most commands never read a template, and the CLI should start fast.
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise CliError(
            f"{file} is neither JSON ({json_error}) nor YAML ({exc})", ExitCode.USAGE
        ) from None


def _path_and_query(url: str) -> tuple[str, dict[str, str]]:
    """The API path of a ``next`` URL (without the public URL's own prefix) and its query."""
    parts = urlsplit(url)
    return parts.path[parts.path.find("/v1/") :], dict(parse_qsl(parts.query))


def _poll(
    client: ApiClient,
    out: Output,
    uuid: str,
    timeout: float,
    until: Callable[[dict[str, Any] | None], bool],
    seen: Observed | None = None,
) -> dict[str, Any] | None:
    """Follows the capsule (None once it is gone), reporting changes, until ``until`` holds,
    from what ``seen`` saw if given. The API holds each look until the capsule changes
    (capsa.api.watch); an API that cannot answers at once, and the next look comes after
    POLL_INTERVAL."""
    deadline = time.monotonic() + timeout
    reported: dict[str, str] = {}
    if seen is not None:
        _report_changes(out, seen.resource, reported)
        if until(seen.resource):
            return dict(seen.resource)
        if seen.pause:
            time.sleep(POLL_INTERVAL)
    while True:
        wait = math.ceil(max(deadline - time.monotonic(), 0))
        seen = client.observe(capsule_path(uuid), seen, wait)
        capsule: dict[str, Any] | None = seen.resource
        if seen.changed and capsule is not None:
            _report_changes(out, capsule, reported)
        if until(capsule):
            return capsule
        if time.monotonic() >= deadline:
            assert capsule is not None
            raise CliError(
                f"timed out after {timeout:g}s waiting for capsule {capsule['name']} "
                f"(status {capsule['status']}, task_state {capsule.get('task_state') or '-'})",
                ExitCode.TIMEOUT,
            )
        if seen.pause:
            time.sleep(POLL_INTERVAL)


def _report_changes(out: Output, capsule: dict[str, Any], seen: dict[str, str]) -> None:
    """Prints what changed since the last poll: the capsule's state, then each container's."""
    items = [(f"capsule {capsule['name']}", capsule)] + [
        (f"  container {c['name']}", c)
        for c in [*capsule.get("init_containers", []), *capsule.get("containers", [])]
    ]
    for subject, item in items:
        line = f"{subject}: {item['status']}"
        if item.get("task_state"):
            line += f" ({item['task_state']})"
        if item.get("status_reason"):
            line += f": {item['status_reason']}"
        if seen.get(item["uuid"]) != line:
            seen[item["uuid"]] = line
            out.progress(line)
