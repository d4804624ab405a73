"""trial schedule

A population-based-training member's hyperparameter schedule: each step at which it continued from another
member's checkpoint with explored values (workers.scheduling), its inherited steps first.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 00:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hp_trials', schema=None) as batch_op:
        batch_op.add_column(sa.Column('schedule', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('hp_trials', schema=None) as batch_op:
        batch_op.drop_column('schedule')
