"""Private registries in the database; passwords only as the tokens that capsa.secrets made."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from capsa.model.clock import utcnow
from capsa.model.registry import Registry
from capsa.store import paging, schema
from capsa.store.db import Database
from capsa.store.paging import Page

r_t = schema.registries
# Read on every capsule create: built once (building it cost more than running it).
_OF_PROJECT = (
    select(r_t)
    .where(r_t.c.project_id == bindparam("project"))
    .order_by(r_t.c.created_at, r_t.c.uuid)
)

# API sort keys and their columns ("id" is Zun's default: the order of creation).
SORT_KEYS: dict[str, Any] = {
    "id": r_t.c.created_at,
    "uuid": r_t.c.uuid,
    "created_at": r_t.c.created_at,
    "domain": r_t.c.domain,
}
# Columns a list may be filtered on, as in Zun.
FILTERS = ("name", "domain", "username", "project_id", "user_id")


class RegistryNameConflict(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(f"a registry named {name!r} already exists in this project")
        self.name = name


class RegistryStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, registry: Registry) -> Registry:
        now = utcnow()
        row = {**_row(registry), "created_at": now, "updated_at": now}
        try:
            await self._db.run_write(lambda conn: conn.execute(r_t.insert().values(**row)))
        except IntegrityError as exc:
            raise _conflict(exc, registry.name) from exc
        return _registry(row)

    async def get(self, uuid: str) -> Registry | None:
        def read(conn: Connection) -> Registry | None:
            row = conn.execute(select(r_t).where(r_t.c.uuid == uuid)).first()
            return _registry(row._mapping) if row else None

        return await self._db.run_read(read)

    async def find(self, ident: str, project_id: str | None) -> Registry | None:
        """A registry by uuid, else by name, within ``project_id`` (None: every project; a name
        may then be taken in several projects, and the oldest is found)."""

        def read(conn: Connection) -> Registry | None:
            scope = [] if project_id is None else [r_t.c.project_id == project_id]
            for column in (r_t.c.uuid, r_t.c.name):
                row = conn.execute(
                    select(r_t).where(column == ident, *scope).order_by(r_t.c.created_at).limit(1)
                ).first()
                if row is not None:
                    return _registry(row._mapping)
            return None

        return await self._db.run_read(read)

    async def of_project(self, project_id: str) -> list[Registry]:
        """Every registry of the project, oldest first."""

        params = {"project": project_id}

        def read(conn: Connection) -> list[Registry]:
            return [_registry(r._mapping) for r in conn.execute(_OF_PROJECT, params)]

        return await self._db.run_read(read)

    async def list_page(
        self, project_id: str | None, page: Page, filters: Mapping[str, str]
    ) -> list[Registry]:
        column = SORT_KEYS[page.sort_key]
        query = select(r_t).where(*(r_t.c[key] == value for key, value in filters.items()))
        if project_id is not None:
            query = query.where(r_t.c.project_id == project_id)

        def read(conn: Connection) -> list[Registry]:
            rows = conn.execute(paging.one_page(conn, query, r_t, column, page, project_id))
            return [_registry(r._mapping) for r in rows]

        return await self._db.run_read(read)

    async def update(self, uuid: str, **values: Any) -> Registry | None:
        """Changes some of name, domain, username and password_token; None if it is gone."""
        values["updated_at"] = utcnow()

        def write(conn: Connection) -> Registry | None:
            conn.execute(update(r_t).where(r_t.c.uuid == uuid).values(**values))
            row = conn.execute(select(r_t).where(r_t.c.uuid == uuid)).first()
            return _registry(row._mapping) if row else None

        try:
            return await self._db.run_write(write)
        except IntegrityError as exc:
            raise _conflict(exc, values.get("name")) from exc

    async def delete(self, uuid: str) -> None:
        await self._db.run_write(lambda conn: conn.execute(delete(r_t).where(r_t.c.uuid == uuid)))


def _conflict(exc: IntegrityError, name: str | None) -> Exception:
    if name is not None and "name" in str(exc):
        return RegistryNameConflict(name)
    return exc


def _row(registry: Registry) -> dict[str, Any]:
    return {
        "uuid": registry.uuid,
        "project_id": registry.project_id,
        "user_id": registry.user_id,
        "name": registry.name,
        "domain": registry.domain,
        "username": registry.username,
        "password_token": registry.password_token,
    }


def _registry(row: Mapping[Any, Any]) -> Registry:
    return Registry(
        uuid=row["uuid"],
        project_id=row["project_id"],
        user_id=row["user_id"],
        name=row["name"],
        domain=row["domain"],
        username=row["username"],
        password_token=row["password_token"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )
