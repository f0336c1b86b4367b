"""Capsules and their containers in the database.

Status writes from the agents are compare-and-swap on the desired state, so that an agent that
observed a capsule a moment ago can never turn a capsule being deleted back into Running.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Select, bindparam, delete, func, or_, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError

from capsa.model.capsule import (
    Address,
    Capsule,
    CapsuleKind,
    CapsuleSpec,
    Container,
    ContainerKind,
    ContainerSpec,
    DesiredState,
    PortSpec,
    PullPolicy,
    RestartPolicy,
    Status,
    TaskState,
)
from capsa.model.clock import utcnow
from capsa.model.host import PlacementRequest
from capsa.model.network import DEVICE_OWNER_CAPSULE
from capsa.model.quota import NO_LIMITS, QuotaLimits, QuotaUsage
from capsa.store import notify, paging, quotas, schema
from capsa.store.db import Database
from capsa.store.hosts import GIVE_BACK_ROOM
from capsa.store.paging import Page

c_t = schema.capsules
k_t = schema.containers

# API sort keys and the columns behind them; only non-null columns, so keyset paging is exact.
SORT_KEYS: dict[str, Any] = {
    "uuid": c_t.c.uuid,
    "name": c_t.c.name,
    "status": c_t.c.status,
    "created_at": c_t.c.created_at,
    "updated_at": c_t.c.updated_at,
    "cpu": c_t.c.cpu_millis,
    "memory": c_t.c.memory_mb,
}


# The statements of the hot paths (an agent's steps, the API's lookups), built once: building
# a statement costs more than SQLite takes to run it.
_BY_UUID = select(c_t).where(c_t.c.uuid == bindparam("ident"))
_BY_UUIDS = select(c_t).where(c_t.c.uuid.in_(bindparam("uuids", expanding=True)))
_EXISTS = select(c_t.c.uuid).where(c_t.c.uuid == bindparam("ident"))
# A capsule's ports are those capsa allocated for it: a port made through the API with the
# capsule's uuid as its device_id (any tenant may write any device_id) is not one of them.
# capsa.store.ports filters with it too.
CAPSA_MADE = schema.ports.c.device_owner == DEVICE_OWNER_CAPSULE
# What a capsule's version is made of: its own last update, its containers' last update, and
# how many ports it has and their last update.
_VERSION_COLUMNS = (
    c_t.c.updated_at,
    select(func.max(k_t.c.updated_at)).where(k_t.c.capsule_uuid == c_t.c.uuid).scalar_subquery(),
    select(func.count())
    .where(schema.ports.c.device_id == c_t.c.uuid, CAPSA_MADE)
    .scalar_subquery(),
    select(func.max(schema.ports.c.updated_at))
    .where(schema.ports.c.device_id == c_t.c.uuid, CAPSA_MADE)
    .scalar_subquery(),
)


def _lookups(*columns: Any) -> dict[bool, tuple[Select[Any], Select[Any]]]:
    """``columns`` of a capsule of a kind by uuid, and by name (two rows at most: enough to
    tell an ambiguous name), in every project (False) or in one (True)."""
    of_kind = c_t.c.kind == bindparam("kind")
    in_project = c_t.c.project_id == bindparam("project")
    by_uuid = select(*columns).where(c_t.c.uuid == bindparam("ident"), of_kind)
    by_name = select(*columns).where(c_t.c.name == bindparam("ident"), of_kind).limit(2)
    return {False: (by_uuid, by_name), True: (by_uuid.where(in_project), by_name.where(in_project))}


_FIND = _lookups(c_t)
_FIND_IDS = _lookups(c_t.c.uuid, c_t.c.project_id)
_FIND_STATE = _lookups(c_t.c.uuid, *_VERSION_COLUMNS, c_t.c.status)
_STATES_OF: Select[Any] = select(c_t.c.uuid, *_VERSION_COLUMNS, c_t.c.status).where(
    c_t.c.uuid.in_(bindparam("uuids", expanding=True))
)
_CONTAINERS_OF = (
    select(k_t)
    .where(k_t.c.capsule_uuid.in_(bindparam("uuids", expanding=True)))
    .order_by(k_t.c.position)
)
_PORTS_OF = (
    select(schema.ports)
    .where(schema.ports.c.device_id.in_(bindparam("uuids", expanding=True)), CAPSA_MADE)
    .order_by(schema.ports.c.interface_index)
)
# The ports of the containers that should run on a host: only their specs' "ports".
_PORTS_TO_RUN_ON = (
    select(k_t.c.capsule_uuid, k_t.c.spec["ports"].label("ports"))
    .join(c_t, c_t.c.uuid == k_t.c.capsule_uuid)
    .where(c_t.c.host == bindparam("host"), c_t.c.desired_state == DesiredState.RUNNING)
    .order_by(k_t.c.capsule_uuid, k_t.c.position)
)
# Capsules waiting for a host: what placing them needs, oldest first.
_PENDING = (
    select(c_t.c.uuid, c_t.c.cpu_millis, c_t.c.memory_mb, c_t.c.runtime, c_t.c.created_at)
    .where(
        c_t.c.host.is_(None),
        c_t.c.desired_state != DesiredState.DELETED,
        c_t.c.status == Status.CREATING,
    )
    .order_by(c_t.c.created_at)
)
_PENDING_OF = _PENDING.where(c_t.c.uuid.in_(bindparam("uuids", expanding=True)))
# Column values come with the parameters; the WHERE's names cannot clash with a column's.
_SET_CAPSULE = update(c_t).where(
    c_t.c.uuid == bindparam("where_uuid"), c_t.c.desired_state == bindparam("where_desired")
)
_SET_CONTAINER = update(k_t).where(k_t.c.uuid == bindparam("where_uuid"))
# A deletion asked for: the desired state (and what the capsule shows meanwhile), returning the
# host whose agent tears it down.
_MARK_DELETED = (
    update(c_t)
    .where(c_t.c.uuid == bindparam("where_uuid"))
    .values(
        desired_state=DesiredState.DELETED,
        status=Status.DELETING,
        task_state=TaskState.CONTAINER_DELETING,
        status_reason=None,
        updated_at=bindparam("now"),
    )
    .returning(c_t.c.host)
)
# A capsule's row; its containers go with it (ON DELETE CASCADE).
_DELETE = (
    delete(c_t)
    .where(c_t.c.uuid == bindparam("uuid"))
    .returning(c_t.c.host, c_t.c.cpu_millis, c_t.c.memory_mb)
)
_DELETE_PORTS_OF = delete(schema.ports).where(
    schema.ports.c.device_id == bindparam("uuid"), CAPSA_MADE
)


class NameConflict(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(f"a capsule named {name!r} already exists in this project")
        self.name = name


class AmbiguousName(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(f"several capsules are named {name!r}; use the uuid instead")
        self.name = name


class WrongState(Exception):
    """An action asked of a capsule whose status does not allow it (or that is being deleted)."""

    def __init__(self, status: Status) -> None:
        super().__init__(f"the capsule is {status}")
        self.status = status


@dataclass(frozen=True)
class ListFilters:
    """What a list keeps, besides the project: Zun's container list filters (None: any)."""

    name: str | None = None
    image: str | None = None
    user_id: str | None = None
    memory_mb: int | None = None
    host: str | None = None
    task_state: str | None = None
    status: str | None = None
    auto_remove: bool | None = None

    def clauses(self) -> list[Any]:
        clauses = [
            column == value
            for column, value in (
                (c_t.c.name, self.name),
                (c_t.c.user_id, self.user_id),
                (c_t.c.memory_mb, self.memory_mb),
                (c_t.c.host, self.host),
                (c_t.c.task_state, self.task_state),
                (c_t.c.status, self.status),
            )
            if value is not None
        ]
        if self.image is not None:
            clauses.append(
                c_t.c.uuid.in_(
                    select(k_t.c.capsule_uuid).where(k_t.c.spec["image"].as_string() == self.image)
                )
            )
        if self.auto_remove is not None:
            flag = c_t.c.metadata["auto_remove"].as_boolean()
            clauses.append(flag.is_(True) if self.auto_remove else or_(flag.is_(None), ~flag))
        return clauses


@dataclass(frozen=True)
class Action:
    """What a tenant asks of a single container, written as desired state for its agent.

    ``allowed``: the statuses it may be asked in (Zun's); the other fields are written as given
    (None leaves a field alone), and ``new_generation`` raises the generation.
    """

    allowed: frozenset[Status]
    task_state: TaskState
    desired_state: DesiredState | None = None
    new_generation: bool = False
    status: Status | None = None
    stop_timeout: int | None = None
    pending_signal: str | None = None


class CapsuleState(NamedTuple):
    """What a look at a capsule reads: its version (see
    :meth:`CapsuleStore.list_page_versions`) and its status."""

    version: str
    status: Status


class CapsuleStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, capsule: Capsule, quota_defaults: QuotaLimits = NO_LIMITS) -> str:
        """Stores a new capsule and its containers if its project's quota allows (OverQuota
        otherwise), in one transaction; the scheduler is woken to place it. Returns the version
        it was stored at (see :meth:`list_page_versions`)."""
        now = utcnow()
        capsule.created_at = capsule.updated_at = now
        for container in capsule.all_containers():
            container.created_at = container.updated_at = now
        capsule_row = _capsule_row(capsule)
        container_rows = [_container_row(c) for c in capsule.all_containers()]
        request = QuotaUsage(
            containers=1, cpu_millis=capsule.spec.cpu_millis, memory_mb=capsule.spec.memory_mb
        )

        def insert(conn: Connection) -> str:
            quotas.enforce(conn, capsule.project_id, request, quota_defaults)
            conn.execute(c_t.insert(), capsule_row)
            conn.execute(k_t.insert(), container_rows)
            notify.wake(conn, notify.SCHEDULER, subject=capsule.uuid)
            # Read back as every other look reads it, so that the two agree to the character.
            return _state(conn.execute(_STATES_OF, {"uuids": [capsule.uuid]}).one()).version

        try:
            return await self._db.run_write(insert)
        except IntegrityError as exc:
            if "uq_capsules_project_name" in str(exc) or "capsules.name" in str(exc):
                raise NameConflict(capsule.name) from exc
            raise

    async def get(self, uuid: str) -> Capsule | None:
        params = {"ident": uuid}
        capsules = await self._db.run_read(
            lambda conn: _load(conn, conn.execute(_BY_UUID, params).all())
        )
        return capsules[0] if capsules else None

    async def exists(self, uuid: str) -> bool:
        """Whether a capsule or single container of that uuid is there, without loading it."""
        params = {"ident": uuid}
        return (
            await self._db.run_read(lambda conn: conn.execute(_EXISTS, params).first()) is not None
        )

    async def find(
        self, ident: str, project_id: str | None, kind: CapsuleKind = CapsuleKind.CAPSULE
    ) -> Capsule | None:
        """A capsule (or single container) by uuid or name, within ``project_id`` (None: in
        every project); AmbiguousName when several of the project(s) have that name."""
        params = {"ident": ident, "project": project_id, "kind": kind}
        lookups = _FIND[project_id is not None]
        capsules = await self._db.run_read(
            lambda conn: _load(conn, _find_rows(conn, lookups, params))
        )
        return capsules[0] if capsules else None

    async def find_state(
        self, ident: str, project_id: str | None, kind: CapsuleKind = CapsuleKind.CAPSULE
    ) -> tuple[str, CapsuleState] | None:
        """The uuid, version (see :meth:`list_page_versions`) and status of the capsule
        :meth:`find` would load, in one small query: what a poll needs to tell that nothing
        changed."""
        params = {"ident": ident, "project": project_id, "kind": kind}
        lookups = _FIND_STATE[project_id is not None]
        rows = await self._db.run_read(lambda conn: _find_rows(conn, lookups, params))
        return (rows[0][0], _state(rows[0])) if rows else None

    async def find_container(
        self, container_uuid: str, project_id: str | None
    ) -> tuple[Capsule, Container] | None:
        """The capsule that holds a container, and the container, within ``project_id``."""
        query = select(k_t.c.capsule_uuid).where(k_t.c.uuid == container_uuid)
        if project_id is not None:
            query = query.where(k_t.c.project_id == project_id)

        def find(conn: Connection) -> list[Capsule]:
            owner = conn.execute(query).scalar_one_or_none()
            if owner is None:
                return []
            return _load(conn, conn.execute(_BY_UUID, {"ident": owner}).all())

        for capsule in await self._db.run_read(find):
            for container in capsule.all_containers():
                if container.uuid == container_uuid:
                    return capsule, container
        return None

    async def list_page(
        self,
        project_id: str | None,
        page: Page,
        kind: CapsuleKind = CapsuleKind.CAPSULE,
        filters: ListFilters = ListFilters(),
    ) -> list[Capsule]:
        """One page of capsules (or single containers), ordered by ``page.sort_key`` then uuid
        (keyset paging)."""

        def list_page(conn: Connection) -> list[Capsule]:
            paged = _one_page(conn, (c_t,), project_id, page, kind, filters)
            return _load(conn, conn.execute(paged).all())

        return await self._db.run_read(list_page, long=True)

    async def list_page_versions(
        self,
        project_id: str | None,
        page: Page,
        kind: CapsuleKind = CapsuleKind.CAPSULE,
        filters: ListFilters = ListFilters(),
    ) -> list[tuple[str, str]]:
        """The uuids of the page :meth:`list_page` would load, each with a version that changes
        whenever anything of the capsule does (its row, its containers' rows, its ports), so that
        what was made of a capsule can be reused as long as its version holds. One query: the
        containers and ports are not read, only their newest timestamps."""
        columns = (c_t.c.uuid, *_VERSION_COLUMNS)

        def versions(conn: Connection) -> list[tuple[str, str]]:
            paged = _one_page(conn, columns, project_id, page, kind, filters)
            return [(row[0], _version(row)) for row in conn.execute(paged)]

        return await self._db.run_read(versions)

    async def states_of(self, uuids: list[str]) -> dict[str, CapsuleState]:
        """The versions (see :meth:`list_page_versions`) and statuses of the capsules of
        ``uuids`` that exist, by uuid, in one query: what tells many waiting clients at once
        whose capsule changed, and into what."""
        params = {"uuids": uuids}
        rows = await self._db.run_read(lambda conn: conn.execute(_STATES_OF, params).all())
        return {row[0]: _state(row) for row in rows}

    async def get_many(self, uuids: list[str]) -> dict[str, Capsule]:
        """The capsules of ``uuids`` that exist, by uuid."""

        def load(conn: Connection) -> list[Capsule]:
            capsules: list[Capsule] = []
            for chunk in _chunks(uuids):
                capsules += _load(conn, conn.execute(_BY_UUIDS, {"uuids": chunk}).all())
            return capsules

        return {c.uuid: c for c in await self._db.run_read(load, long=len(uuids) > 20)}

    async def pending_placements(
        self, uuids: Collection[str] | None = None
    ) -> list[PlacementRequest]:
        """Capsules waiting for a host (all, or those of ``uuids``), oldest first: only what
        placing them needs."""
        if uuids is None:
            rows: Sequence[Any] = await self._db.run_read(
                lambda conn: conn.execute(_PENDING).all(), long=True
            )
        else:
            chunks = list(_chunks(list(uuids)))

            def of(conn: Connection) -> list[Any]:
                return [
                    row for chunk in chunks for row in conn.execute(_PENDING_OF, {"uuids": chunk})
                ]

            rows = await self._db.run_read(of, long=len(uuids) > 20)
            if len(chunks) > 1:
                rows = sorted(rows, key=lambda row: row.created_at)
        return [PlacementRequest(r.uuid, r.cpu_millis, r.memory_mb, r.runtime) for r in rows]

    async def list_for_host(self, host: str) -> list[Capsule]:
        query = select(c_t).where(c_t.c.host == host)
        return await self._db.run_read(
            lambda conn: _load(conn, conn.execute(query).all()), long=True
        )

    async def count(self, project_id: str | None) -> int:
        query = select(func.count()).select_from(c_t)
        if project_id is not None:
            query = query.where(c_t.c.project_id == project_id)
        return await self._db.run_read(lambda conn: int(conn.execute(query).scalar_one()))

    async def request_delete(self, uuid: str) -> None:
        """Deletes a capsule that has no host at once; otherwise asks its agent to tear it down."""
        now = utcnow()
        await self._db.run_write(lambda conn: _request_delete(conn, uuid, now))

    async def find_and_request_delete(
        self, ident: str, project_id: str | None, kind: CapsuleKind = CapsuleKind.CAPSULE
    ) -> tuple[str, str] | None:
        """:meth:`request_delete` of the capsule that :meth:`find` would load, in the same
        transaction as the lookup; its uuid and project, or None when there is none."""
        params = {"ident": ident, "project": project_id, "kind": kind}
        lookups = _FIND_IDS[project_id is not None]
        now = utcnow()

        def find_and_request(conn: Connection) -> tuple[str, str] | None:
            rows = _find_rows(conn, lookups, params)
            if not rows:
                return None
            found = rows[0]
            _request_delete(conn, found.uuid, now)
            return found.uuid, found.project_id

        return await self._db.run_write(find_and_request)

    async def request_action(self, uuid: str, action: Action) -> None:
        """Writes what ``action`` asks, if the capsule's status allows it (WrongState otherwise),
        and wakes its agent. The check and the write are one transaction."""
        values: dict[str, Any] = {"task_state": action.task_state, "status_reason": None}
        for field in ("desired_state", "status", "stop_timeout", "pending_signal"):
            if getattr(action, field) is not None:
                values[field] = getattr(action, field)
        if action.new_generation:
            values["generation"] = c_t.c.generation + 1
        values["updated_at"] = utcnow()

        def request(conn: Connection) -> None:
            row = conn.execute(
                select(c_t.c.status, c_t.c.desired_state, c_t.c.host).where(c_t.c.uuid == uuid)
            ).first()
            if row is None or row.desired_state == DesiredState.DELETED:
                raise WrongState(Status.DELETING)
            if row.status not in action.allowed:
                raise WrongState(_STATUSES[row.status])
            conn.execute(update(c_t).where(c_t.c.uuid == uuid).values(**values))
            if "status" in values:
                notify.wake(conn, notify.CAPSULE_STATUS, subject=uuid)
            if row.host is not None:
                notify.wake(conn, notify.host_topic(row.host), subject=uuid)

        await self._db.run_write(request)

    async def rename(self, uuid: str, name: str) -> None:
        """Renames a capsule (and, for a single container, its container); NameConflict when
        the name is taken."""

        def rename(conn: Connection) -> None:
            now = utcnow()
            row = conn.execute(select(c_t.c.kind).where(c_t.c.uuid == uuid)).first()
            conn.execute(update(c_t).where(c_t.c.uuid == uuid).values(name=name, updated_at=now))
            if row is not None and row.kind == CapsuleKind.CONTAINER:
                conn.execute(
                    update(k_t).where(k_t.c.capsule_uuid == uuid).values(name=name, updated_at=now)
                )

        try:
            await self._db.run_write(rename)
        except IntegrityError as exc:
            raise NameConflict(name) from exc

    async def signal_sent(self, uuid: str, signal: str) -> None:
        """Forgets a pending signal once sent, unless the tenant asked for another meanwhile."""
        await self._db.run_write(
            lambda conn: conn.execute(
                update(c_t)
                .where(c_t.c.uuid == uuid, c_t.c.pending_signal == signal)
                .values(pending_signal=None)
            )
        )

    async def update_status(
        self,
        uuid: str,
        *,
        expect: DesiredState = DesiredState.RUNNING,
        containers: Mapping[str, Mapping[str, Any]] | None = None,
        **values: Any,
    ) -> bool:
        """Sets capsule fields only while the capsule's desired state is ``expect``; in the same
        transaction, the fields of its ``containers`` (by container uuid) in any case.

        Returns False when the capsule is gone or the tenant changed their mind meanwhile.
        """
        now = utcnow()
        container_params = [
            {**fields, "updated_at": now, "where_uuid": container_uuid}
            for container_uuid, fields in (containers or {}).items()
        ]
        params = {**values, "updated_at": now, "where_uuid": uuid, "where_desired": expect}

        def update(conn: Connection) -> bool:
            for fields in container_params:
                conn.execute(_SET_CONTAINER, fields)
            if not values:
                return True
            if not conn.execute(_SET_CAPSULE, params).rowcount:
                return False
            if "status" in values:
                notify.wake(conn, notify.CAPSULE_STATUS, subject=uuid)
            return True

        return await self._db.run_write(update)

    async def update_container(self, uuid: str, **values: Any) -> None:
        params = {**values, "updated_at": utcnow(), "where_uuid": uuid}
        await self._db.run_write(lambda conn: conn.execute(_SET_CONTAINER, params))

    async def remove(self, uuid: str) -> bool:
        """Removes a torn-down capsule with its containers and ports, and releases its claim.

        One transaction, so a crash leaves either all of it or none; repeating it is harmless.
        """
        params = {"uuid": uuid}
        now = utcnow()

        def remove(conn: Connection) -> bool:
            conn.execute(_DELETE_PORTS_OF, params)
            row = conn.execute(_DELETE, params).first()
            if row is None:
                return False
            if row.host is not None:
                room = {"host": row.host, "cpu": row.cpu_millis, "memory": row.memory_mb}
                conn.execute(GIVE_BACK_ROOM, {**room, "now": now})
            # Its ports are gone. No scheduler wake-up: no capsule waits for room (one that
            # finds none fails at once), and the next pass sees the room.
            notify.wake(conn, notify.NETWORK)
            notify.wake(conn, notify.CAPSULE_STATUS, subject=uuid)
            return True

        return await self._db.run_write(remove)


def _request_delete(conn: Connection, uuid: str, now: datetime) -> None:
    """Asks the agent of the capsule's host to tear it down, or deletes it at once if no host
    claimed it. The mark comes first and the claim needs a capsule not marked: a scheduler
    racing this either placed the capsule before (its agent is woken) or cannot place it."""
    row = conn.execute(_MARK_DELETED, {"where_uuid": uuid, "now": now}).first()
    if row is None:
        return
    # Deleting now, or gone.
    notify.wake(conn, notify.CAPSULE_STATUS, subject=uuid)
    if row.host is None:
        conn.execute(_DELETE, {"uuid": uuid})
    else:
        notify.wake(conn, notify.host_topic(row.host), subject=uuid)


def _one_page(
    conn: Connection,
    columns: Sequence[Any],
    project_id: str | None,
    page: Page,
    kind: CapsuleKind,
    filters: ListFilters,
) -> Select[Any]:
    """``columns`` of the capsules of a list's page: :meth:`CapsuleStore.list_page` and
    :meth:`CapsuleStore.list_page_versions` page alike."""
    query = select(*columns).where(c_t.c.kind == kind, *filters.clauses())
    if project_id is not None:
        query = query.where(c_t.c.project_id == project_id)
    return paging.one_page(conn, query, c_t, SORT_KEYS[page.sort_key], page, project_id)


def _find_rows(
    conn: Connection, lookups: tuple[Select[Any], Select[Any]], params: dict[str, Any]
) -> Sequence[Row[Any]]:
    """The rows of a capsule named by uuid, or else by name (AmbiguousName if several)."""
    by_uuid, by_name = lookups
    rows = conn.execute(by_uuid, params).all() or conn.execute(by_name, params).all()
    if len(rows) > 1:
        raise AmbiguousName(params["ident"])
    return rows


def _version(row: Sequence[Any]) -> str:
    """A capsule's version from a row of its uuid and :data:`_VERSION_COLUMNS`."""
    return "|".join(map(str, row[1:]))


def _state(row: Row[Any]) -> CapsuleState:
    """A capsule's state from a row of its uuid, :data:`_VERSION_COLUMNS` and status."""
    return CapsuleState(_version(row[:-1]), _STATUSES[row[-1]])


def ports_to_run(conn: Connection, host: str) -> list[tuple[str, PortSpec]]:
    """The container ports of the capsules that should run on ``host``, each with its capsule's
    uuid; reads the ports of the containers' specs, nothing else."""
    return [
        (capsule_uuid, PortSpec(*port))
        for capsule_uuid, ports in conn.execute(_PORTS_TO_RUN_ON, {"host": host})
        for port in ports
    ]


def _capsule_row(capsule: Capsule) -> dict[str, Any]:
    spec = capsule.spec
    return {
        "uuid": capsule.uuid,
        "kind": spec.kind,
        "name": spec.name,
        "project_id": capsule.project_id,
        "user_id": capsule.user_id,
        "desired_state": capsule.desired_state,
        "status": capsule.status,
        "status_reason": capsule.status_reason,
        "task_state": capsule.task_state,
        "restart_policy": spec.restart_policy,
        "runtime": spec.runtime,
        "metadata": {
            "labels": spec.labels,
            "annotations": spec.annotations,
            "hostname": spec.hostname,
            "max_retries": spec.max_retries,
            "auto_remove": spec.auto_remove,
        },
        "cpu_millis": spec.cpu_millis,
        "memory_mb": spec.memory_mb,
        "host": capsule.host,
        "sandbox_id": capsule.sandbox_id,
        "generation": capsule.generation,
        "stop_timeout": capsule.stop_timeout,
        "pending_signal": capsule.pending_signal,
        "created_at": capsule.created_at,
        "updated_at": capsule.updated_at,
    }


def _container_row(container: Container) -> dict[str, Any]:
    spec = container.spec
    return {
        "uuid": container.uuid,
        "capsule_uuid": container.capsule_uuid,
        "project_id": container.project_id,
        "user_id": container.user_id,
        "kind": container.kind,
        "position": container.position,
        "name": spec.name,
        "spec": {
            "image": spec.image,
            "image_pull_policy": spec.image_pull_policy,
            "command": spec.command,
            "args": spec.args,
            "workdir": spec.workdir,
            "env": spec.env,
            "cpu_millis": spec.cpu_millis,
            "memory_mb": spec.memory_mb,
            "tty": spec.tty,
            "stdin": spec.stdin,
            "ports": [[p.container_port, p.protocol, p.host_port, p.name] for p in spec.ports],
            "registry_id": spec.registry_id,
            "privileged": spec.privileged,
        },
        "status": container.status,
        "status_reason": container.status_reason,
        "task_state": container.task_state,
        "cri_container_id": container.cri_container_id,
        "restart_count": container.restart_count,
        "exit_code": container.exit_code,
        "started_at": container.started_at,
        "finished_at": container.finished_at,
        "created_at": container.created_at,
        "updated_at": container.updated_at,
    }


def _container(row: Row[Any]) -> Container:
    doc = row.spec
    spec = ContainerSpec(
        name=row.name,
        image=doc["image"],
        cpu_millis=doc["cpu_millis"],
        memory_mb=doc["memory_mb"],
        command=tuple(doc["command"]),
        args=tuple(doc["args"]),
        workdir=doc["workdir"],
        env=doc["env"],
        image_pull_policy=_PULL_POLICIES[doc["image_pull_policy"]],
        tty=doc["tty"],
        stdin=doc["stdin"],
        ports=tuple(PortSpec(*p) for p in doc["ports"]),
        registry_id=doc.get("registry_id"),
        privileged=doc["privileged"],
    )
    return Container(
        uuid=row.uuid,
        capsule_uuid=row.capsule_uuid,
        project_id=row.project_id,
        user_id=row.user_id,
        kind=_KINDS[row.kind],
        position=row.position,
        spec=spec,
        status=_STATUSES[row.status],
        status_reason=row.status_reason,
        task_state=_TASK_STATES[row.task_state] if row.task_state else None,
        cri_container_id=row.cri_container_id,
        restart_count=row.restart_count,
        exit_code=row.exit_code,
        started_at=row.started_at,
        finished_at=row.finished_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


# Plain lookups: calling an Enum class per value costs more than the rest of a row.
_STATUSES = {s.value: s for s in Status}
_TASK_STATES = {t.value: t for t in TaskState}
_KINDS = {k.value: k for k in ContainerKind}
_PULL_POLICIES = {p.value: p for p in PullPolicy}
_RESTART_POLICIES = {p.value: p for p in RestartPolicy}
_DESIRED_STATES = {d.value: d for d in DesiredState}
_CAPSULE_KINDS = {k.value: k for k in CapsuleKind}


def _load(conn: Connection, rows: Sequence[Row[Any]]) -> list[Capsule]:
    """Turns capsule rows into capsules with their containers and addresses (three queries)."""
    if not rows:
        return []
    uuids = [r.uuid for r in rows]
    containers: dict[str, list[Container]] = {u: [] for u in uuids}
    for chunk in _chunks(uuids):
        for row in conn.execute(_CONTAINERS_OF, {"uuids": chunk}).all():
            containers[row.capsule_uuid].append(_container(row))
    addresses: dict[str, list[Address]] = {u: [] for u in uuids}
    for chunk in _chunks(uuids):
        for row in conn.execute(_PORTS_OF, {"uuids": chunk}).all():
            addresses[row.device_id].append(
                Address(
                    network_id=row.network_id,
                    subnet_id=row.subnet_id,
                    port_id=row.id,
                    ip=row.ip_address,
                    mac=row.mac_address,
                    version=6 if ":" in row.ip_address else 4,
                )
            )
    capsules = []
    for row in rows:
        apps: list[Container] = []
        inits: list[Container] = []
        for member in containers[row.uuid]:
            (apps if member.kind is ContainerKind.APP else inits).append(member)
        spec = CapsuleSpec(
            name=row.name,
            containers=tuple(c.spec for c in apps),
            init_containers=tuple(c.spec for c in inits),
            labels=row.metadata["labels"],
            annotations=row.metadata["annotations"],
            restart_policy=_RESTART_POLICIES[row.restart_policy],
            runtime=row.runtime,
            kind=_CAPSULE_KINDS[row.kind],
            hostname=row.metadata["hostname"],
            max_retries=row.metadata["max_retries"],
            auto_remove=row.metadata["auto_remove"],
        )
        capsules.append(
            Capsule(
                uuid=row.uuid,
                project_id=row.project_id,
                user_id=row.user_id,
                spec=spec,
                status=_STATUSES[row.status],
                status_reason=row.status_reason,
                task_state=_TASK_STATES[row.task_state] if row.task_state else None,
                desired_state=_DESIRED_STATES[row.desired_state],
                host=row.host,
                sandbox_id=row.sandbox_id,
                generation=row.generation,
                stop_timeout=row.stop_timeout,
                pending_signal=row.pending_signal,
                containers=apps,
                init_containers=inits,
                addresses=addresses[row.uuid],
                created_at=row.created_at,
                updated_at=row.updated_at,
            )
        )
    return capsules


def _chunks(items: list[str], size: int = 500) -> Iterable[list[str]]:
    # SQLite limits the number of bound parameters in one statement.
    for start in range(0, len(items), size):
        yield items[start : start + size]
