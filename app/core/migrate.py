"""Schema upgrades: Alembic for the service's tables, Optuna's own for its tables."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app.core.db import Database, is_sqlite
from app.core.optuna_store import optuna_storage

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


PG_LOCK_KEY = 0x6870_7365_6172  # "hpsear": one key for every hpsearch migration on a server


@contextmanager
def exclusive(url: str) -> Iterator[None]:
    """One schema change at a time: `serve`, `keys create` and `db upgrade` may all start together on a
    fresh database, and two Alembic runs would both create the same tables ("already exists").

    SQLite: a lock on a file beside the database; PostgreSQL: a session advisory lock. Either is released
    when its holder exits, also when it dies.
    """
    if is_sqlite(url):
        path = make_url(url).database
        if not path or path == ":memory:":
            yield
            return
        lock = Path(f"{path}.migrate-lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield
        return
    db = Database(url, pool_size=1)
    try:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": PG_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": PG_LOCK_KEY})
    finally:
        db.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database to `revision`, then let Optuna create or upgrade its tables."""
    with exclusive(url):
        db = Database(url)
        with db.engine.connect():  # creates the SQLite folder and turns on WAL before anyone else connects
            pass
        db.dispose()
        command.upgrade(alembic_config(url), revision)
        optuna_storage(url)


def downgrade(url: str, revision: str) -> None:
    with exclusive(url):
        command.downgrade(alembic_config(url), revision)
