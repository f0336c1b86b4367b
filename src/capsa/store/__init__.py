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


class Store:
    """One database and the hub that wakes reconcilers after its changes."""

    def __init__(self, url: str, hub: ChangeHub | None = None) -> None:
        self.db = Database(url)
        self.hub = hub or ChangeHub()
        self.capsules = CapsuleStore(self.db, self.hub)
        self.hosts = HostStore(self.db, self.hub)
        self.networks = NetworkStore(self.db, self.hub)
        self.ports = PortStore(self.db, self.hub)
        self.quotas = QuotaStore(self.db)
        self.registries = RegistryStore(self.db)
        self.privileged = PrivilegedProjectStore(self.db)
        self.identity = IdentityStore(self.db)

    async def open(self) -> None:
        await self.db.initialize()

    async def close(self) -> None:
        await self.db.close()


__all__ = ["Store"]
