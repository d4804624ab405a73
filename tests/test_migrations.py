"""Migrations: upgrade from empty matches the models, downgrade works, Optuna's tables coexist."""

from __future__ import annotations

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
