"""Schema upgrades: Alembic for the service's tables, Optuna's own for its tables."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from app.core.db import Database
from app.core.optuna_store import optuna_storage

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database to `revision`, then let Optuna create or upgrade its tables."""
    db = Database(url)
    with db.engine.connect():  # creates the SQLite folder and turns on WAL before anyone else connects
        pass
    db.dispose()
    command.upgrade(alembic_config(url), revision)
    optuna_storage(url)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)
