"""trial extension

The epoch a completed trial is being extended to: a client asked it to continue from its checkpoint for more
epochs. Set while the extension waits or runs; cleared when it ends.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 21:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hp_trials', schema=None) as batch_op:
        batch_op.add_column(sa.Column('epochs_target', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('hp_trials', schema=None) as batch_op:
        batch_op.drop_column('epochs_target')
