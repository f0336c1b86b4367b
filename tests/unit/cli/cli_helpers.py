"""What the CLI tests share."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


CliRunner = Callable[..., Awaitable[Run]]
