"""Migrations: upgrade from empty matches the models, downgrade works, Optuna's tables coexist."""

from __future__ import annotations

import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.core import migrate
from app.models import Base


def _own_tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return {t for t in inspect(engine).get_table_names() if t.startswith("hp_")}
    finally:
        engine.dispose()


def test_upgrade_from_empty_matches_the_models(db_url: str) -> None:
    # db_url is already at head (the fixture migrates); compare it with the live models
    engine = create_engine(db_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"include_name": lambda n, t, p: t != "table" or
                                                     bool(n and n.startswith("hp_"))})
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    assert diff == []


def test_downgrade_to_base_and_back(db_url: str) -> None:
    assert _own_tables(db_url) == set(Base.metadata.tables)
    migrate.downgrade(db_url, "base")
    assert _own_tables(db_url) == set()
    migrate.upgrade(db_url)
    assert _own_tables(db_url) == set(Base.metadata.tables)


def test_optuna_tables_share_the_database(db_url: str) -> None:
    engine = create_engine(db_url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"studies", "trials", "alembic_version", "hpsearch_alembic_version"} <= tables


def test_processes_migrating_a_fresh_database_together_all_succeed(db_url: str) -> None:
    """`serve`, `keys create` and `db upgrade` may start together on an empty database: one migrates at a
    time, the others find it done."""
    migrate.downgrade(db_url, "base")
    code = f"from app.core import migrate; migrate.upgrade({db_url!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE) for _ in range(3)]
    errors = [p.communicate(timeout=120)[1].decode()[-500:] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert _own_tables(db_url) == set(Base.metadata.tables)
