"""study ensemble

The top-k ensemble chosen at finalization (members, weights, validation and test metrics of the best single
model and of the ensemble), as one JSON document per study.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 08:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hp_studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('ensemble', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('hp_studies', schema=None) as batch_op:
        batch_op.drop_column('ensemble')
