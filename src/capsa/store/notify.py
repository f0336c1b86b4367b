"""Wake-ups after a change in the database, so reconcilers act at once instead of at their resync.

A wake-up carries no state: the woken reconciler reads the database, which stays the only truth,
and a lost wake-up only delays work until the next periodic resync. It may name its *subject* (the
capsule that changed), so that the reconciler looks at that capsule instead of at everything. The
store publishes after each commit that gives someone work: the scheduler (a capsule to place) or a
host's agent (a capsule to start or delete). This hub works within one process (all-in-one);
several processes sharing a database fall back on their resync interval until a cross-process
channel is added.
"""

from __future__ import annotations

import asyncio

SCHEDULER = "scheduler"


# Ports, security groups or rules changed: the hosts' network agents recompute their firewall.
NETWORK = "network"


def host_topic(host: str) -> str:
    return f"host:{host}"


class Subscription:
    def __init__(self, hub: ChangeHub, topic: str) -> None:
        self._hub = hub
        self.topic = topic
        self._event = asyncio.Event()
        self._subjects: set[str] | None = set()

    def _wake(self, subject: str | None) -> None:
        if subject is None:
            self._subjects = None
        elif self._subjects is not None:
            self._subjects.add(subject)
        self._event.set()

    def take_subjects(self) -> set[str] | None:
        """What the wake-ups since the last call named; None when one of them named nothing,
        so that only a look at everything is enough."""
        subjects, self._subjects = self._subjects, set()
        return subjects

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

    def subscribe(self, topic: str) -> Subscription:
        sub = Subscription(self, topic)
        self._subscriptions.setdefault(topic, set()).add(sub)
        return sub

    def publish(self, *topics: str, subject: str | None = None) -> None:
        for topic in topics:
            for sub in self._subscriptions.get(topic, ()):
                sub._wake(subject)

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subscriptions.get(sub.topic)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subscriptions[sub.topic]
