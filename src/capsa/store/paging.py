"""Keyset paging, as Zun's lists page: ``limit``, ``marker`` (the last uuid seen), ``sort_key``
and ``sort_dir``, ordered by the sort column then the uuid so that every page is exact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, or_


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


def after(
    column: Any, uuid_column: Any, value: Any, marker_uuid: str, descending: bool
) -> ColumnElement[bool]:
    """Rows that come after the marker's (``value``, ``marker_uuid``) in the page's order."""
    if descending:
        return or_(column < value, and_(column == value, uuid_column < marker_uuid))
    return or_(column > value, and_(column == value, uuid_column > marker_uuid))


def ordering(column: Any, uuid_column: Any, descending: bool) -> tuple[Any, Any]:
    return (column.desc(), uuid_column.desc()) if descending else (column, uuid_column)
