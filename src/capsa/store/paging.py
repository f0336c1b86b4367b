"""Keyset paging, as Zun's lists page: ``limit``, ``marker`` (the last uuid seen), ``sort_key``
and ``sort_dir``, ordered by the sort column then the uuid so that every page is exact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, Table, and_, or_, select
from sqlalchemy.engine import Connection


@dataclass(frozen=True)
class Page:
    limit: int
    marker: str | None = None
    sort_key: str = "created_at"
    sort_dir: str = "asc"

    @property
    def descending(self) -> bool:
        return self.sort_dir == "desc"


class MarkerNotFound(Exception):
    def __init__(self, marker: str) -> None:
        super().__init__(f"marker {marker!r} is not an item of this list")
        self.marker = marker


def one_page(
    conn: Connection,
    query: Select[Any],
    table: Table,
    column: Any,
    page: Page,
    project_id: str | None,
) -> Select[Any]:
    """``query`` (rows of ``table``, already limited to ``project_id`` if given) narrowed to the
    page: after the marker, ordered by ``column`` then uuid, at most ``page.limit`` rows."""
    uuid = table.c.uuid
    if page.marker is not None:
        marker_query = select(column, uuid).where(uuid == page.marker)
        if project_id is not None:
            marker_query = marker_query.where(table.c.project_id == project_id)
        marker = conn.execute(marker_query).first()
        if marker is None:
            raise MarkerNotFound(page.marker)
        value, marker_uuid = marker[0], marker[1]
        query = query.where(
            or_(column < value, and_(column == value, uuid < marker_uuid))
            if page.descending
            else or_(column > value, and_(column == value, uuid > marker_uuid))
        )
    order = (column.desc(), uuid.desc()) if page.descending else (column, uuid)
    return query.order_by(*order).limit(page.limit)
