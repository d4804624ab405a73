"""trial rung

The rung (an epoch) where a trial waits paused by its study's scheduler (ASHA with promotion) until a free
slot promotes it; null for every other trial, a client's pause included.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 21:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hp_trials', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rung', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('hp_trials', schema=None) as batch_op:
        batch_op.drop_column('rung')
