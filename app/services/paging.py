"""Opaque keyset cursors: pages stay fast and stable however deep a client pages."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement

from app.services.errors import InvalidInput

# The kinds of value a cursor can hold, as the caller that pages by them names them.
CursorKind = type[datetime] | type[str] | type[int] | type[float]
MAX_INT = 2**63 - 1  # the widest integer column; beyond it database drivers overflow


def encode_cursor(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def column_kinds(columns: Sequence[ColumnElement[Any]]) -> list[CursorKind]:
    """The kind of each SQL expression a page is ordered by, from its type: cursors follow the keys."""
    kinds: list[CursorKind] = []
    for column in columns:
        sql_type = getattr(column.type, "impl_instance", column.type)  # a TypeDecorator's stored type
        kind = sql_type.python_type
        if kind not in (datetime, str, int, float):
            raise TypeError(f"cannot page by {column} of type {sql_type}")
        kinds.append(kind)
    return kinds


def decode_cursor(cursor: str, kinds: Sequence[CursorKind]) -> list[Any]:
    """The values of a cursor, one of each kind in kinds (datetimes parsed, timezone-aware, in UTC).

    A client can send any cursor: everything that is not what encode_cursor wrote for these kinds is
    InvalidInput, never a value that makes the database or the driver fail.
    """
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(values, list) or len(values) != len(kinds):
            raise ValueError("wrong shape")
        return [_checked(value, kind) for value, kind in zip(values, kinds, strict=True)]
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise InvalidInput(("query", "cursor"), "not a cursor this endpoint returned") from None


def _checked(value: Any, kind: CursorKind) -> Any:
    if kind is datetime:
        if not isinstance(value, str):
            raise TypeError(kind)
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:  # the columns hold UTC and refuse naive datetimes
            raise ValueError("naive datetime")
        return parsed.astimezone(UTC)  # OverflowError near year 1 or 9999
    if kind is str:
        # Ids are printable ASCII; NUL or a lone surrogate would fail inside the driver.
        if not isinstance(value, str) or not (value.isascii() and value.isprintable()):
            raise TypeError(kind)
        return value
    # Numbers: a float kind also takes integers (SQLite returns 0, not 0.0, for a missing value).
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(kind)
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise ValueError("integer out of range")
        return value
    if kind is int or not math.isfinite(value):  # json.loads accepts NaN and Infinity
        raise ValueError("not an integer or not finite")
    return value
