"""How the agent tells a failure the tenant must act on from one that passes by itself."""

from __future__ import annotations

import re

from capsa.cri.client import CriError

# gRPC codes of a runtime that is restarting, overloaded or slow: worth another try.
_TRANSIENT_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "RESOURCE_EXHAUSTED"})
# containerd refuses a name, or a start, that an unfinished request (for example one an agent
# killed mid-call left) holds; it finishes that request, and the next pass finds its result.
_NAME_TAKEN = "is reserved for"
_TRANSIENT_MESSAGES = (_NAME_TAKEN, "failed to reserve", "is already in starting state")
# containerd 1.6 refuses to remove a container (and so its sandbox) while it holds a task of it,
# even one that CRI calls exited: a StartContainer cut short once the shim had made the task
# leaves it so, and nothing in CRI ever deletes that task.
_STRANDED_TASK = re.compile(r"cannot delete running task ([^\s:]+)")


class CapsuleFailed(Exception):
    """The capsule cannot run as asked; it goes to Error with this message as status_reason."""


class RetryLater(Exception):
    """The step failed for a reason that may pass; the agent tries again after a delay."""


def classify(exc: CriError, doing: str) -> CapsuleFailed | RetryLater:
    """The agent's view of a CRI failure during ``doing`` (e.g. "starting container web")."""
    text = f"{doing}: {exc.message}"
    if exc.code in _TRANSIENT_CODES or any(m in exc.message for m in _TRANSIENT_MESSAGES):
        return RetryLater(text)
    return CapsuleFailed(text)


def name_taken(exc: CriError) -> bool:
    """Whether the runtime refused a sandbox or container because another holds its name."""
    return exc.code == "ALREADY_EXISTS" or _NAME_TAKEN in exc.message


def stranded_task(exc: CriError) -> str | None:
    """The container whose task made the runtime refuse a removal (of it, or of its sandbox)."""
    found = _STRANDED_TASK.search(exc.message)
    return found.group(1) if found else None
