"""Which database errors a worker waits out and which it reports at once."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
from optuna.exceptions import StorageInternalError
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from app.core.db import is_transient


def test_a_busy_sqlite_or_a_lost_server_is_transient_a_missing_table_is_not() -> None:
    engine = create_engine("sqlite://")
    with pytest.raises(OperationalError) as missing, engine.connect() as conn:
        conn.execute(text("SELECT * FROM no_such_table"))
    assert not is_transient(missing.value)  # retrying for minutes would only hide the bug
    locked = OperationalError("UPDATE ...", {}, sqlite3.OperationalError("database is locked"))
    assert is_transient(locked)
    assert is_transient(OperationalError("SELECT 1", {}, psycopg.OperationalError("connection refused")))
    try:  # Optuna wraps SQLAlchemy's errors; the cause decides
        raise StorageInternalError("An exception is raised during the commit.") from locked
    except StorageInternalError as wrapped:
        assert is_transient(wrapped)
