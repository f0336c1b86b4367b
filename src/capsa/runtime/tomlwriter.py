"""A small TOML writer for the config files capsa renders for containerd.

The standard library reads TOML (tomllib) but cannot write it.
"""

from __future__ import annotations

import json
from typing import Any


def render_toml(table: dict[str, Any]) -> str:
    """TOML for nested dicts of strings, numbers, booleans and lists of those.

    JSON's string escapes are valid in TOML basic strings; keys that are not bare get quoted.
    """
    lines: list[str] = []
    _emit_table(table, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _emit_table(table: dict[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    if path and (scalars or not tables):
        lines.append("")
        lines.append(f"[{'.'.join(_key(p) for p in path)}]")
    lines.extend(f"{_key(k)} = {_value(v)}" for k, v in scalars.items())
    for key, sub in tables.items():
        _emit_table(sub, [*path, key], lines)


def _key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key)
    return key if bare else json.dumps(key, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
