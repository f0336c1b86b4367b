from __future__ import annotations

import tomllib
from typing import Any

import pytest

from capsa.runtime.tomlwriter import render_toml


def test_round_trip_through_tomllib() -> None:
    data: dict[str, Any] = {
        "version": 2,
        "ratio": 0.5,
        "flag": False,
        "list": ["a", 'q"uote', "back\\slash", "tab\tand\nnewline", "ünïcode 😀"],
        "outer": {
            "inner": {"key with spaces": "v", "http://127.0.0.1:5000": {"capabilities": ["pull"]}},
            "scalar": "x",
        },
        "empty": {},
        "io.containerd.grpc.v1.cri": {"dotted": True},
    }
    assert tomllib.loads(render_toml(data)) == data


def test_tables_only_holding_tables_get_no_header() -> None:
    text = render_toml({"plugins": {"a": {"x": 1}}})
    assert text == "[plugins.a]\nx = 1\n"


def test_unsupported_values_are_refused() -> None:
    with pytest.raises(TypeError, match="NoneType"):
        render_toml({"x": None})
