"""worker plugins

The model and dataset plugins each worker has (name, kind, version, import error), so that `GET /workers`
shows which worker can run which study.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 20:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hp_workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('plugins', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('hp_workers', schema=None) as batch_op:
        batch_op.drop_column('plugins')
