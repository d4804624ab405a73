"""trial checkpoint

The latest checkpoint a running trial recorded (path relative to the artifact dir, its epoch and bytes), so
that an attempt whose runner or worker died resumes from it instead of starting over.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 08:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hp_trials', schema=None) as batch_op:
        batch_op.add_column(sa.Column('checkpoint_path', sa.String(length=500), nullable=True))
        batch_op.add_column(sa.Column('checkpoint_epoch', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('checkpoint_bytes', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('hp_trials', schema=None) as batch_op:
        batch_op.drop_column('checkpoint_bytes')
        batch_op.drop_column('checkpoint_epoch')
        batch_op.drop_column('checkpoint_path')
