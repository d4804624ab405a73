"""Keyset cursors: what encode_cursor writes decodes to the same values; anything else is InvalidInput."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from app.services.errors import InvalidInput
from app.services.paging import decode_cursor, encode_cursor
from app.services.trials import cursor_kinds


def test_a_cursor_round_trips_with_its_kinds() -> None:
    created = datetime(2025, 1, 31, 10, 2, 3, 417000, tzinfo=UTC)
    assert decode_cursor(encode_cursor([created.isoformat(), "ab12"]), (datetime, str)) == [created, "ab12"]
    assert decode_cursor(encode_cursor([1, -0.25, 7]), (int, float, int)) == [1, -0.25, 7]
    assert decode_cursor(encode_cursor([0, 0, 3]), (int, float, int)) == [0, 0, 3]  # SQLite's 0 for a float


def test_dates_come_back_in_utc() -> None:
    here = datetime(2025, 1, 31, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    (back,) = decode_cursor(encode_cursor([here.isoformat()]), (datetime,))
    assert back == here and back.tzinfo == UTC


@pytest.mark.parametrize("values", [[1], ["2025-01-31T12:00:00"], ["0001-01-01T00:00:00+01:00"], [None],
                                    [["2025-01-31T12:00:00+00:00"]]])
def test_bad_dates_are_invalid_input(values: list[Any]) -> None:
    with pytest.raises(InvalidInput):
        decode_cursor(encode_cursor(values), (datetime,))


def test_the_kinds_follow_the_sort_keys() -> None:
    """Trials page by their sort keys: by value the second key holds a float, by number an integer."""
    by_value, by_number, newest = cursor_kinds("value"), cursor_kinds("number"), cursor_kinds("newest")
    assert by_value[1] is float and by_number[1] is int and newest[1] is datetime
    assert set(by_value) <= {int, float, str, datetime}
