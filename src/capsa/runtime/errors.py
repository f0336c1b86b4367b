"""The failures of the host runtime pieces; ``capsa up`` reports any :class:`HostRuntimeError`."""

from __future__ import annotations


class HostRuntimeError(RuntimeError):
    """containerd, the registry or the local images cannot be brought up; the message says why."""
