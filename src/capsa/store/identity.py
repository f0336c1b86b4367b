"""Projects, users, role assignments and revoked tokens of the local identity service.

A token is checked against these rows on every request (:meth:`IdentityStore.principal`, one read),
so that disabling a user, deleting a project or removing a role takes effect at once.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, delete, exists, or_, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError

from capsa.model.clock import utcnow
from capsa.model.identity import Principal, Project, RoleAssignment, User
from capsa.store import schema
from capsa.store.db import Database, dialect_insert

p_t = schema.projects
u_t = schema.users
r_t = schema.role_assignments
rev_t = schema.revoked_tokens

# Every authenticated request asks it, so it is one statement, built once: the roles of an
# enabled user in an enabled project, and whether the token was revoked.
_PRINCIPAL = (
    select(
        u_t.c.name,
        p_t.c.name,
        r_t.c.role,
        exists().where(rev_t.c.audit_id == bindparam("audit")).label("revoked"),
    )
    .select_from(r_t)
    .join(u_t, u_t.c.id == r_t.c.user_id)
    .join(p_t, p_t.c.id == r_t.c.project_id)
    .where(
        r_t.c.user_id == bindparam("user"),
        r_t.c.project_id == bindparam("project"),
        u_t.c.enabled.is_(True),
        p_t.c.enabled.is_(True),
    )
)


class IdentityConflict(Exception):
    """A project or user of that name exists already."""


def new_id() -> str:
    """Keystone's form of ids: 32 hex digits."""
    return uuid.uuid4().hex


class IdentityStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def _insert_named(self, table: Table, what: str, **values: Any) -> None:
        """Inserts a row whose name is unique, made and updated now; IdentityConflict when the
        name is taken."""
        insert = table.insert().values(**values, updated_at=values["created_at"])
        try:
            await self._db.run_write(lambda conn: conn.execute(insert))
        except IntegrityError:
            raise IdentityConflict(f"a {what} named {values['name']!r} exists already") from None

    # ---- projects ----

    async def create_project(self, name: str, description: str = "") -> Project:
        project = Project(
            id=new_id(), name=name, description=description, enabled=True, created_at=utcnow()
        )
        await self._insert_named(p_t, "project", **asdict(project))
        return project

    async def find_project(self, ident: str) -> Project | None:
        """The project with this id or, failing that, this name."""
        return await self._db.run_read(lambda conn: _find_project(conn, ident))

    async def projects(self) -> list[Project]:
        query = select(p_t).order_by(p_t.c.name)
        return await self._db.run_read(lambda conn: [_project(r) for r in conn.execute(query)])

    async def set_project_enabled(self, project_id: str, enabled: bool) -> None:
        statement = (
            update(p_t).where(p_t.c.id == project_id).values(enabled=enabled, updated_at=utcnow())
        )
        await self._db.run_write(lambda conn: conn.execute(statement))

    async def delete_project(self, project_id: str) -> None:
        """Removes the project, every role in it (its tokens stop working with it) and its
        allowance of privileged containers."""

        def remove(conn: Connection) -> None:
            conn.execute(delete(r_t).where(r_t.c.project_id == project_id))
            privileged = schema.privileged_projects
            conn.execute(delete(privileged).where(privileged.c.project_id == project_id))
            conn.execute(
                update(u_t)
                .where(u_t.c.default_project_id == project_id)
                .values(default_project_id=None)
            )
            conn.execute(delete(p_t).where(p_t.c.id == project_id))

        await self._db.run_write(remove)

    # ---- users ----

    async def create_user(
        self, name: str, password_hash: str, default_project_id: str | None = None
    ) -> User:
        user = User(
            id=new_id(),
            name=name,
            enabled=True,
            default_project_id=default_project_id,
            created_at=utcnow(),
        )
        await self._insert_named(u_t, "user", **asdict(user), password_hash=password_hash)
        return user

    async def find_user(self, ident: str) -> User | None:
        """The user with this id or, failing that, this name."""
        found = await self._db.run_read(lambda conn: _find_user_row(conn, ident))
        return _user(found) if found else None

    async def user_with_password(self, ident: str) -> tuple[User, str] | None:
        """The user and its password hash, for checking a password only."""
        found = await self._db.run_read(lambda conn: _find_user_row(conn, ident))
        return (_user(found), found.password_hash) if found else None

    async def users(self) -> list[User]:
        query = select(u_t).order_by(u_t.c.name)
        return await self._db.run_read(lambda conn: [_user(r) for r in conn.execute(query)])

    async def update_user(
        self,
        user_id: str,
        *,
        enabled: bool | None = None,
        password_hash: str | None = None,
        default_project_id: str | None = None,
    ) -> None:
        values: dict[str, Any] = {"updated_at": utcnow()}
        if enabled is not None:
            values["enabled"] = enabled
        if password_hash is not None:
            values["password_hash"] = password_hash
        if default_project_id is not None:
            values["default_project_id"] = default_project_id
        statement = update(u_t).where(u_t.c.id == user_id).values(**values)
        await self._db.run_write(lambda conn: conn.execute(statement))

    async def delete_user(self, user_id: str) -> None:
        def remove(conn: Connection) -> None:
            conn.execute(delete(r_t).where(r_t.c.user_id == user_id))
            conn.execute(delete(u_t).where(u_t.c.id == user_id))

        await self._db.run_write(remove)

    # ---- roles ----

    async def add_role(self, user_id: str, project_id: str, role: str) -> bool:
        """Gives ``role`` in the project; False when the user held it already."""

        def add(conn: Connection) -> bool:
            insert = dialect_insert(conn, r_t).values(
                user_id=user_id, project_id=project_id, role=role
            )
            return bool(conn.execute(insert.on_conflict_do_nothing()).rowcount)

        return await self._db.run_write(add)

    async def remove_role(self, user_id: str, project_id: str, role: str) -> bool:
        """Takes ``role`` away; False when the user did not hold it."""
        statement = delete(r_t).where(
            r_t.c.user_id == user_id, r_t.c.project_id == project_id, r_t.c.role == role
        )
        result = await self._db.run_write(lambda conn: conn.execute(statement))
        return bool(result.rowcount)

    async def assignments(
        self, user_id: str | None = None, project_id: str | None = None
    ) -> list[RoleAssignment]:
        query = (
            select(r_t.c.role, u_t.c.id, u_t.c.name, p_t.c.id, p_t.c.name)
            .join(u_t, u_t.c.id == r_t.c.user_id)
            .join(p_t, p_t.c.id == r_t.c.project_id)
            .order_by(p_t.c.name, u_t.c.name, r_t.c.role)
        )
        if user_id is not None:
            query = query.where(r_t.c.user_id == user_id)
        if project_id is not None:
            query = query.where(r_t.c.project_id == project_id)

        def read(conn: Connection) -> list[RoleAssignment]:
            return [
                RoleAssignment(
                    user_id=user,
                    user_name=user_name,
                    project_id=project,
                    project_name=project_name,
                    role=role,
                )
                for role, user, user_name, project, project_name in conn.execute(query)
            ]

        return await self._db.run_read(read)

    # ---- tokens ----

    async def principal(
        self, user_id: str, project_id: str, audit_id: str | None = None
    ) -> Principal | None:
        """Who a token of ``user_id`` scoped to ``project_id`` stands for now: None when the user
        or the project is gone or disabled, the user holds no role there any more, or the token
        (``audit_id``) was revoked."""

        params = {"user": user_id, "project": project_id, "audit": audit_id}

        def read(conn: Connection) -> Principal | None:
            rows = conn.execute(_PRINCIPAL, params).all()
            if not rows or rows[0].revoked:
                return None
            return Principal(
                user_id=user_id,
                user_name=rows[0][0],
                project_id=project_id,
                project_name=rows[0][1],
                roles=frozenset(row[2] for row in rows),
            )

        return await self._db.run_read(read)

    async def revoke(self, audit_id: str, expires_at: datetime) -> None:
        """Revokes a token until it expires; revocations of expired tokens are dropped."""

        def write(conn: Connection) -> None:
            conn.execute(delete(rev_t).where(rev_t.c.expires_at < utcnow()))
            insert = dialect_insert(conn, rev_t).values(audit_id=audit_id, expires_at=expires_at)
            conn.execute(insert.on_conflict_do_nothing())

        await self._db.run_write(write)


def _find_project(conn: Connection, ident: str) -> Project | None:
    row = _by_id_or_name(conn, p_t, ident)
    return _project(row) if row else None


def _find_user_row(conn: Connection, ident: str) -> Row[Any] | None:
    return _by_id_or_name(conn, u_t, ident)


def _by_id_or_name(conn: Connection, table: Table, ident: str) -> Row[Any] | None:
    """The row whose id is ``ident``, else the one of that name (names are unique)."""
    query = select(table).where(or_(table.c.id == ident, table.c.name == ident))
    return conn.execute(query.order_by((table.c.id == ident).desc())).first()


def _project(row: Row[Any]) -> Project:
    return Project(
        id=row.id,
        name=row.name,
        description=row.description,
        enabled=row.enabled,
        created_at=row.created_at,
    )


def _user(row: Row[Any]) -> User:
    return User(
        id=row.id,
        name=row.name,
        enabled=row.enabled,
        default_project_id=row.default_project_id,
        created_at=row.created_at,
    )
