"""The database: tables, queries and change notifications. Nothing above it writes SQL."""

from __future__ import annotations

from capsa.store.capsules import CapsuleStore
from capsa.store.db import Database
from capsa.store.hosts import HostStore
from capsa.store.identity import IdentityStore
from capsa.store.networks import NetworkStore
from capsa.store.notify import ChangeHub
from capsa.store.ports import PortStore
from capsa.store.privileged import PrivilegedProjectStore
from capsa.store.quotas import QuotaStore
from capsa.store.registries import RegistryStore
from capsa.store.wakefeed import WakeupFollower


class Store:
    """One database and the hub that wakes reconcilers after its changes.

    With ``wakeup_poll_interval`` (seconds), wake-ups also cross processes: each change writes
    them into the database, and this process reads the others' that often
    (:mod:`capsa.store.wakefeed`); None keeps them within the process.
    """

    def __init__(
        self,
        url: str,
        hub: ChangeHub | None = None,
        *,
        wakeup_poll_interval: float | None = None,
    ) -> None:
        self.hub = hub or ChangeHub()
        self.db = Database(url, self.hub, shared_wakeups=wakeup_poll_interval is not None)
        self._follower = (
            None if wakeup_poll_interval is None else WakeupFollower(self.db, wakeup_poll_interval)
        )
        self.capsules = CapsuleStore(self.db)
        self.hosts = HostStore(self.db)
        self.networks = NetworkStore(self.db)
        self.ports = PortStore(self.db)
        self.quotas = QuotaStore(self.db)
        self.registries = RegistryStore(self.db)
        self.privileged = PrivilegedProjectStore(self.db)
        self.identity = IdentityStore(self.db)

    async def open(self) -> None:
        await self.db.initialize()
        if self._follower is not None:
            await self._follower.start()

    async def close(self) -> None:
        if self._follower is not None:
            await self._follower.stop()
        await self.db.close()


__all__ = ["Store"]
