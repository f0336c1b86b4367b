"""How the agent tells a failure the tenant must act on from one that passes by itself."""

from __future__ import annotations

from capsa.cri.client import CriError

# gRPC codes of a runtime that is restarting, overloaded or slow: worth another try.
_TRANSIENT_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "RESOURCE_EXHAUSTED"})
# containerd refuses a name, or a start, that an unfinished request (for example one an agent
# killed mid-call left) holds; it finishes that request, and the next pass finds its result.
_NAME_TAKEN = "is reserved for"
_TRANSIENT_MESSAGES = (_NAME_TAKEN, "failed to reserve", "is already in starting state")


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
