"""Alembic environment. Migrations never import the live models: each revision is frozen."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

VERSION_TABLE = "hpsearch_alembic_version"  # Optuna keeps its own `alembic_version` in the same database


def _url() -> str:
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set sqlalchemy.url (hpsearch db upgrade does) or HPSEARCH_DATABASE_URL")
    return url


def _own_tables(name: str | None, type_: str, _parent: object) -> bool:
    return type_ != "table" or bool(name and name.startswith("hp_"))


def run_migrations_offline() -> None:
    context.configure(url=_url(), literal_binds=True, version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = context.config.attributes.get("connection")
    if connectable is None:
        connectable = create_engine(_url(), poolclass=pool.NullPool)
    with connectable.connect() if hasattr(connectable, "connect") else connectable as connection:
        context.configure(connection=connection, version_table=VERSION_TABLE, render_as_batch=True,
                          # only when writing a new revision (scripts/new_migration.py); never at run time
                          target_metadata=context.config.attributes.get("target_metadata"),
                          include_name=_own_tables)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
