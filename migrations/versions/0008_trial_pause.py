"""trial pause

When a client asked to pause a running trial: its worker checkpoints it at the next epoch boundary and the
trial waits `paused` until a client resumes it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 13:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hp_trials', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pause_requested_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('hp_trials', schema=None) as batch_op:
        batch_op.drop_column('pause_requested_at')
