"""Engine and transaction scopes for SQLite (embedded) and PostgreSQL."""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

SQLITE_BUSY_TIMEOUT_S = 30.0
# Workers ride out a database restart instead of failing the trials they run: a transient error is
# retried with backoff for this long before it is raised.
RETRY_PATIENCE_S = 300.0
RETRY_BASE_DELAY_S = 0.2
RETRY_MAX_DELAY_S = 2.0
log = logging.getLogger("hpsearch.db")
P = ParamSpec("P")
T = TypeVar("T")


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    """An engine with the settings each backend needs for many processes sharing it."""
    if is_sqlite(url):
        path = make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False})
        _configure_sqlite(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size)


def _configure_sqlite(engine: Engine) -> None:
    # pysqlite's own BEGIN handling cannot issue BEGIN IMMEDIATE; take it over.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', 'DEFERRED')}")


def end_frozen_transactions(after_s: float) -> None:
    """Have PostgreSQL end any transaction of this process that sits idle for after_s (libpq reads PGOPTIONS
    at every connect, Optuna's engine included).

    A worker frozen inside a transaction (SIGSTOP, a paused VM) would hold its row locks for as long as it is
    frozen: the reaper skips locked rows, so its lease would never be reaped. Workers pass the lease grace:
    a worker silent that long is lost either way.
    """
    limit = f"-c idle_in_transaction_session_timeout={max(1, int(after_s * 1000))}"
    os.environ["PGOPTIONS"] = f"{os.environ.get('PGOPTIONS', '')} {limit}".strip()


class Database:
    """Owns the engine; hands out sessions whose scope is one transaction."""

    def __init__(self, url: str, *, pool_size: int = 5) -> None:
        self.url = url
        self.engine = make_engine(url, pool_size=pool_size)
        self.is_sqlite = is_sqlite(url)
        # SQLite fails a read-then-write transaction at once (SQLITE_BUSY, busy_timeout or not) when
        # another writer got in between; taking the write lock at BEGIN makes such transactions wait.
        self._write_engine = (
            self.engine.execution_options(sqlite_begin="IMMEDIATE") if self.is_sqlite else self.engine
        )

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction that may write: commits on success, rolls back on any error.

        SQLite: takes the database's write lock at once; PostgreSQL: rows are locked by the queries.
        """
        with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A read-only transaction; on SQLite (WAL) it never waits for writers."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def is_transient(exc: BaseException) -> bool:
    """A dropped connection, a busy database or a deadlock: worth trying the same transaction again.

    Looks through wrappers (Optuna raises StorageInternalError from SQLAlchemy's errors).
    """
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, OperationalError):
            # sqlite3 also raises OperationalError for errors no retry mends ("no such table", a read-only
            # file): of SQLite's, only a busy or locked database passes. psycopg's are the server's state.
            message = str(seen.orig).lower()
            return not isinstance(seen.orig, sqlite3.Error) or "locked" in message or "busy" in message
        if isinstance(seen, DBAPIError) and seen.connection_invalidated:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def retry_on_disconnect(fn: Callable[..., T], *args: Any, patience_s: float | None = None, **kwargs: Any) -> T:
    """Run fn again with exponential backoff while it fails with a transient database error.

    Gives up after `patience_s` (RETRY_PATIENCE_S by default). fn must be one transaction that is safe to
    repeat: pool_pre_ping replaces the dead connection.
    """
    give_up_at = time.monotonic() + (RETRY_PATIENCE_S if patience_s is None else patience_s)
    delay = RETRY_BASE_DELAY_S
    attempt = 0
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            attempt += 1
            if not is_transient(exc) or time.monotonic() + delay > give_up_at:
                raise
            log.warning("database error in %s, retrying (attempt %d): %s", getattr(fn, "__name__", fn),
                        attempt, str(exc).splitlines()[0][:200])
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY_S)


def retrying(fn: Callable[P, T]) -> Callable[P, T]:
    """Decorator form of retry_on_disconnect for functions that are one repeatable transaction."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        return retry_on_disconnect(fn, *args, **kwargs)

    return wrapper
