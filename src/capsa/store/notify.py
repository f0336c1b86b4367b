"""Wake-ups after a change in the database, so reconcilers act at once instead of at their resync.

A wake-up carries no state: the woken reconciler reads the database, which stays the only truth,
and a lost wake-up only delays work until the next periodic resync. It may name its *subject* (the
capsule that changed), so that the reconciler looks at that capsule instead of at everything.

A write transaction names the wake-ups its change gives (:func:`wake`: the scheduler has a capsule
to place, a host's agent a capsule to start or delete, the network agents something to enforce);
once it commits, and only then, the database hands them to this process's :class:`ChangeHub`,
which wakes its subscribers at once (from a thread of capsa's own, through its event loop:
:func:`call_soon_on`, which the thread may hold until it answered its caller). Other processes
sharing the database (other hosts) learn of them through the database itself when
:mod:`capsa.store.wakefeed` is on: the transaction also writes them there, and each process
follows that table.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

SCHEDULER = "scheduler"


# Ports, security groups or rules changed: the hosts' network agents recompute their firewall.
NETWORK = "network"


def host_topic(host: str) -> str:
    return f"host:{host}"


# Any write transaction of this process committed. Published by the database itself, in this
# process only (never into the shared feed): for what waits on a change that no reconciler is
# woken for, such as a client waiting for its capsule to change, which then reads again.
COMMITTED = "committed"


# A capsule's status changed, or the capsule went (subject: its uuid). For what waits for a
# capsule to reach a status, such as a client waiting for it to run, which then reads only it:
# most writes of a capsule's start (its ports, its steps) leave its status as it was.
CAPSULE_STATUS = "capsule-status"


# Where a write transaction keeps the wake-ups it names until it ends (its connection's info).
_PENDING = "capsa_wakeups"
# Per thread: the calls to event loops that it holds (hold_wakeups), or None.
_held = threading.local()
_LoopCall = tuple[asyncio.AbstractEventLoop, Callable[..., None], tuple[Any, ...]]


def call_soon_on(
    loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any
) -> None:
    """Runs ``callback(*args)`` on ``loop`` soon, from any thread: at once, or once this thread
    releases the wake-ups it holds (:func:`hold_wakeups`)."""
    held: list[_LoopCall] | None = getattr(_held, "calls", None)
    if held is None:
        loop.call_soon_threadsafe(callback, *args)
    else:
        held.append((loop, callback, args))


def hold_wakeups() -> None:
    """Holds this thread's calls to event loops (:func:`call_soon_on`: the wake-ups of its
    writes) until :func:`release_wakeups`. For a thread that answers a caller waiting on it after
    its writes: a woken loop starts what the wake-up asks for and takes the GIL from the thread,
    which then waits for it before it can answer (the CNI ADD's answer took 0.2 ms, 1.9 at p90,
    instead of 0.04)."""
    _held.calls = []


def release_wakeups() -> None:
    """Makes the calls that this thread held, in their order; one wake of each loop."""
    held: list[_LoopCall] | None = getattr(_held, "calls", None)
    _held.calls = None
    by_loop: dict[asyncio.AbstractEventLoop, list[_LoopCall]] = {}
    for call in held or ():
        by_loop.setdefault(call[0], []).append(call)
    for loop, calls in by_loop.items():
        loop.call_soon_threadsafe(_run_all, calls)


def _run_all(calls: list[_LoopCall]) -> None:
    for _, callback, args in calls:
        callback(*args)


@dataclass(frozen=True)
class Wakeup:
    topic: str
    subject: str | None = None


def wake(conn: Connection, *topics: str, subject: str | None = None) -> None:
    """Wakes the reconcilers of ``topics`` once the write transaction of ``conn`` commits (not if
    it rolls back); ``subject`` names what changed, when one thing did."""
    try:
        pending: dict[Wakeup, None] = conn.info[_PENDING]
    except KeyError:
        raise RuntimeError(
            "wake-ups are given by write transactions (Database.run_write)"
        ) from None
    for topic in topics:
        pending[Wakeup(topic, subject)] = None


def collect(conn: Connection) -> None:
    """Starts collecting the wake-ups of the transaction about to run on ``conn``."""
    conn.info[_PENDING] = {}


def collected(conn: Connection) -> list[Wakeup]:
    """The wake-ups named since :func:`collect`, each once, in order; stops collecting."""
    return list(conn.info.pop(_PENDING, {}))


class Subscription:
    def __init__(self, hub: ChangeHub, topics: tuple[str, ...]) -> None:
        self._hub = hub
        self.topics = topics
        self._event = asyncio.Event()
        self._subjects: dict[str, set[str] | None] = {topic: set() for topic in topics}

    def _wake(self, topic: str, subject: str | None) -> None:
        subjects = self._subjects[topic]
        if subject is None:
            self._subjects[topic] = None
        elif subjects is not None:
            subjects.add(subject)
        self._event.set()

    def nudge(self) -> None:
        """Wakes the subscriber without naming anything: the caller knows what to look at."""
        self._event.set()

    def take_subjects(self, topic: str | None = None) -> set[str] | None:
        """What the wake-ups of ``topic`` (the subscription's only topic if None) named since
        the last call; None when one of them named nothing, so that only a look at everything
        is enough."""
        topic = self.topics[0] if topic is None else topic
        subjects, self._subjects[topic] = self._subjects[topic], set()
        return subjects

    def discard_pending(self) -> None:
        """Forgets the wake-ups so far: the caller is about to look at everything they named."""
        self._event.clear()

    async def wait(self, timeout: float) -> bool:
        """Waits for a wake-up or the timeout; True when woken. Wake-ups before the call count."""
        try:
            # Not wait_for: on Python 3.11 it swallows a cancellation that arrives as the event
            # is set, and a reconciler being stopped would then wait a whole resync interval.
            async with asyncio.timeout(timeout):
                await self._event.wait()
        except TimeoutError:
            return False
        finally:
            self._event.clear()
        return True

    def close(self) -> None:
        self._hub._unsubscribe(self)


class ChangeHub:
    def __init__(self) -> None:
        self._subscriptions: dict[str, set[Subscription]] = {}
        # How many wake-ups were published so far: a reader notes it before it reads, and
        # knows afterwards whether anything may have changed meanwhile.
        self.published = 0

    def subscribe(self, *topics: str) -> Subscription:
        sub = Subscription(self, topics)
        for topic in topics:
            self._subscriptions.setdefault(topic, set()).add(sub)
        return sub

    def publish(self, *topics: str, subject: str | None = None) -> None:
        self.published += 1
        for topic in topics:
            for sub in self._subscriptions.get(topic, ()):
                sub._wake(topic, subject)

    def publish_all(self, wakeups: list[Wakeup]) -> None:
        for wakeup in wakeups:
            self.publish(wakeup.topic, subject=wakeup.subject)

    def _unsubscribe(self, sub: Subscription) -> None:
        for topic in sub.topics:
            subs = self._subscriptions.get(topic)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subscriptions[topic]
