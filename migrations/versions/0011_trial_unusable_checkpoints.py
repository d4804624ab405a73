"""trial unusable checkpoints

How many checkpoints of a trial a resuming attempt could not use (truncated, mismatched, missing) and passed
over for an older one or a start from scratch: /metrics sums them.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 22:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hp_trials', schema=None) as batch_op:
        batch_op.add_column(sa.Column('unusable_checkpoints', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('hp_trials', schema=None) as batch_op:
        batch_op.drop_column('unusable_checkpoints')
