"""Which local ports the host's firewall enforces now: the network agent tells, the CNI daemon asks.

A port's security group rules and its network's isolation must be in the kernel before the port's
veth is on a bridge: until then, the bridge's catch-all rules would take the pod's traffic for
the overlay's and let it pass. The compute agent asks for a new capsule's sandbox while its ports
are being allocated, so the network agent's pass that enforces them can end after containerd has
already called the CNI plugin; the daemon's ADD then waits for that pass (bounded), instead of
relying on the allocation having come first. A waiting ADD also asks for a pass: the network
agent may not have heard of the ports (allocated by another process, which reaches this one's
agent only at its resync), or its last pass may have failed (it retries at the next wake-up).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable


class FirewallProgress:
    """The ports enforced by the network agent's latest applied pass, and a way to wait for the
    next pass. In-process only: the CNI daemon and the network agent of a host share one. The
    agent updates it on the event loop; the daemon reads it and waits on its own threads."""

    def __init__(self) -> None:
        self._ports: frozenset[str] = frozenset()
        self._passes = 0
        self._changed = threading.Condition()
        self._ask_for_pass: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def serve(self, ask_for_pass: Callable[[], None]) -> None:
        """The network agent, on its event loop, says how to wake it for a pass."""
        self._loop = asyncio.get_running_loop()
        self._ask_for_pass = ask_for_pass

    def want_pass(self) -> None:
        """Wakes the network agent for a pass (coalesced with one under way or due); from any
        thread."""
        if self._ask_for_pass is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._ask_for_pass)

    def applied(self, port_ids: Iterable[str]) -> None:
        """A pass brought the firewall to a view whose local ports are ``port_ids``."""
        with self._changed:
            self._ports = frozenset(port_ids)
            self._passes += 1
            self._changed.notify_all()

    @property
    def passes(self) -> int:
        """How many passes were applied: what :meth:`wait_for_pass` waits to see grow."""
        return self._passes

    def enforces(self, port_ids: Iterable[str]) -> bool:
        return self._ports.issuperset(port_ids)

    def wait_for_pass(self, seen: int, timeout: float) -> None:
        """Blocks until a pass after the ``seen``-th was applied, or ``timeout`` seconds passed.
        Never on the event loop: the pass it waits for is applied there."""
        with self._changed:
            self._changed.wait_for(lambda: self._passes != seen, timeout)
