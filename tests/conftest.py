"""Fixtures: a fresh migrated database per test on SQLite and on the real PostgreSQL, settings, API clients."""

from __future__ import annotations

import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.core import migrate
from app.core.config import Settings
from app.core.db import Database

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
POSTGRES_ADMIN_URL = os.environ.get("HPSEARCH_TEST_POSTGRES_URL",
                                    "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
_pg_state: dict[str, str | None] = {}
# Tests train in this process and fork runners from it, as a supervisor does: one torch thread here, or a
# multi-threaded op would leave an OpenMP team that hangs the next forked runner (see runner.warm_imports).
torch.set_num_threads(1)


def _postgres_template() -> str:
    """A migrated template database, made once per test session; skip (never in CI) without a server."""
    if "template" in _pg_state:
        if _pg_state["template"] is None:
            pytest.skip(_pg_state["why"] or "PostgreSQL unavailable")
        return str(_pg_state["template"])
    name = f"hpsearch_tmpl_{os.getpid()}"
    try:
        admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
    except Exception as exc:  # noqa: BLE001
        why = f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {type(exc).__name__}"
        if os.environ.get("CI"):
            raise RuntimeError(f"{why}; CI must run the PostgreSQL tests") from exc
        _pg_state.update(template=None, why=why)
        pytest.skip(why)
    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(url)
    from app.core.optuna_store import optuna_storage

    optuna_storage(url).engine.dispose()
    _pg_state["template"] = name
    return name


def _fresh_postgres() -> Iterator[str]:
    template = _postgres_template()
    name = f"hpsearch_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def fresh_database(kind: str, home: Path, sqlite_template: Path) -> Iterator[str]:
    """A migrated database ("sqlite" or "postgresql") for fixtures wider than one test; PostgreSQL's is
    dropped when the generator finishes."""
    if kind == "sqlite":
        shutil.copy(sqlite_template, home / "hpsearch.db")
        yield f"sqlite:///{home / 'hpsearch.db'}"
    else:
        yield from _fresh_postgres()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    url = f"sqlite:///{path}"
    migrate.upgrade(url)
    from app.core.optuna_store import optuna_storage

    optuna_storage(url).engine.dispose()
    # Fold the write-ahead log into the file so that a plain copy holds every table.
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> Iterator[str]:
    """A fresh, migrated database: the same tests run on SQLite and PostgreSQL."""
    if request.param == "sqlite":
        path = tmp_path / "hpsearch.db"
        shutil.copy(sqlite_template, path)
        yield f"sqlite:///{path}"
    else:
        yield from _fresh_postgres()


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    path = tmp_path / "hpsearch.db"
    shutil.copy(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from _fresh_postgres()


def make_settings(url: str, home: Path, **overrides: object) -> Settings:
    return Settings(home=home, database_url=url, mnist_dir=MNIST_DIR, heartbeat_interval_s=0.5, lease_grace_s=5.0,
                    rate_limit_burst=10_000, rate_limit_per_s=10_000, **overrides)  # type: ignore[arg-type]


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return make_settings(db_url, tmp_path / "home")


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings.database_url)
    yield database
    database.dispose()
