"""Opaque keyset cursors: pages stay fast and stable however deep a client pages."""

from __future__ import annotations

import base64
import json
from typing import Any

from app.services.errors import InvalidInput


def encode_cursor(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, length: int) -> list[Any]:
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except ValueError:
        values = None
    if not isinstance(values, list) or len(values) != length:
        raise InvalidInput(("query", "cursor"), "not a cursor this endpoint returned")
    return values
