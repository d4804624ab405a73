"""Write a new Alembic revision from the difference between the models and a migrated database.

Usage: python scripts/new_migration.py "what changed"
"""

from __future__ import annotations

import sys
import tempfile

from alembic import command

from app.core.migrate import alembic_config, upgrade
from app.models import Base


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/scratch.db"
        upgrade(url)
        cfg = alembic_config(url)
        cfg.attributes["target_metadata"] = Base.metadata
        command.revision(cfg, message=sys.argv[1], autogenerate=True)


if __name__ == "__main__":
    main()
