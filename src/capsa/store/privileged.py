"""Which projects an admin allowed to run privileged containers (none unless allowed).

The API reads this when a capsule asks for a privileged container; ``capsa project set
--allow-privileged`` changes it. Allowing or forbidding again changes nothing.
"""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.engine import Connection

from capsa.model.clock import utcnow
from capsa.store import schema
from capsa.store.db import Database, dialect_insert

pp_t = schema.privileged_projects


class PrivilegedProjectStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def allowed(self, project_id: str) -> bool:
        query = select(pp_t.c.project_id).where(pp_t.c.project_id == project_id)
        return await self._db.run_read(lambda conn: conn.execute(query).first() is not None)

    async def allowed_projects(self) -> set[str]:
        query = select(pp_t.c.project_id)
        return await self._db.run_read(lambda conn: set(conn.execute(query).scalars()))

    async def set_allowed(self, project_id: str, allowed: bool) -> bool:
        """Allows or forbids privileged containers in the project; False when it already was."""

        def write(conn: Connection) -> bool:
            if allowed:
                insert = dialect_insert(conn, pp_t).values(
                    project_id=project_id, created_at=utcnow()
                )
                return bool(conn.execute(insert.on_conflict_do_nothing()).rowcount)
            forbid = delete(pp_t).where(pp_t.c.project_id == project_id)
            return bool(conn.execute(forbid).rowcount)

        return await self._db.run_write(write)
