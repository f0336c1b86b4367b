"""What ``capsa`` prints: aligned tables for people, JSON for scripts (``--json``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def text(value: Any) -> str:
    """A cell: ``-`` for nothing, ``k=v`` pairs for maps, commas for lists."""
    if value is None or value == "" or value == {} or value == []:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def ipv4_addresses(capsule: dict[str, Any]) -> str:
    return text(
        [
            entry["addr"]
            for entries in (capsule.get("addresses") or {}).values()
            for entry in entries
            if entry.get("version") == 4
        ]
    )


CAPSULE_COLUMNS = ("UUID", "NAME", "STATUS", "TASK_STATE", "ADDRESSES", "CPU", "MEMORY", "CREATED")


def capsule_row(capsule: dict[str, Any]) -> list[str]:
    return [
        capsule["uuid"],
        capsule["name"],
        capsule["status"],
        text(capsule.get("task_state")),
        ipv4_addresses(capsule),
        f"{capsule['cpu']:g}",
        f"{capsule['memory']}Mi",
        text(capsule.get("created_at")),
    ]


def capsule_details(capsule: dict[str, Any]) -> str:
    fields = [
        ("uuid", capsule["uuid"]),
        ("name", capsule["name"]),
        ("status", capsule["status"]),
        ("task_state", text(capsule.get("task_state"))),
        ("status_reason", text(capsule.get("status_reason"))),
        ("restart_policy", capsule["restart_policy"]["Name"]),
        ("cpu", f"{capsule['cpu']:g}"),
        ("memory", f"{capsule['memory']}Mi"),
        ("addresses", ipv4_addresses(capsule)),
        ("labels", text(capsule.get("labels"))),
        ("annotations", text(capsule.get("annotations"))),
    ]
    if "host" in capsule:
        fields.append(("host", text(capsule["host"])))
    fields += [("created_at", capsule["created_at"]), ("updated_at", capsule["updated_at"])]
    width = max(len(name) for name, _ in fields)
    details = "\n".join(f"{name.ljust(width)}  {value}" for name, value in fields)
    containers = [("init", c) for c in capsule.get("init_containers", [])] + [
        ("app", c) for c in capsule.get("containers", [])
    ]
    rows = [
        [
            kind,
            c["name"],
            c["uuid"],
            c["image"],
            c["status"],
            text(c.get("status_detail") or c.get("status_reason")),
        ]
        for kind, c in containers
    ]
    return details + "\n\n" + table(("KIND", "NAME", "UUID", "IMAGE", "STATUS", "DETAIL"), rows)


class Output:
    """Where results (stdout) and progress or errors (stderr) go."""

    def __init__(
        self, as_json: bool, stdout: TextIO | None = None, stderr: TextIO | None = None
    ) -> None:
        self.as_json = as_json
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr

    def result(self, data: Any, human: str) -> None:
        """``data`` as JSON with --json, else the ``human`` rendering."""
        print(json.dumps(data, indent=2) if self.as_json else human, file=self.stdout)

    def progress(self, message: str) -> None:
        print(message, file=self.stderr, flush=True)

    def error(self, message: str) -> None:
        print(f"capsa: error: {message}", file=self.stderr, flush=True)
