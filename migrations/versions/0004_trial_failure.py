"""trial failure kind

Why a trial's last attempt failed, as a small enum (lost, deadline, non_finite, out_of_memory, process_died,
error, worker_error, cancelled), so metrics and tools count failures without parsing the message, which
stays in `error` for people. Existing failed rows are classified from their messages once.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 21:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hp_trials', schema=None) as batch_op:
        batch_op.add_column(sa.Column('failure', sa.String(length=16), nullable=True))
    # Messages as earlier versions wrote them; whatever else failed is an error of the trial itself.
    op.execute("UPDATE hp_trials SET failure = CASE "
               "WHEN error LIKE '%lost (no heartbeat)%' THEN 'lost' "
               "WHEN error LIKE 'deadline exceeded%' THEN 'deadline' "
               "WHEN error LIKE 'non_finite%' THEN 'non_finite' "
               "WHEN error LIKE 'out_of_memory%' THEN 'out_of_memory' "
               "WHEN error LIKE 'trial process died%' THEN 'process_died' "
               "WHEN error LIKE 'worker error%' THEN 'worker_error' "
               "WHEN error LIKE 'stopped:%' THEN 'cancelled' "
               "ELSE 'error' END WHERE state = 'fail'")


def downgrade() -> None:
    with op.batch_alter_table('hp_trials', schema=None) as batch_op:
        batch_op.drop_column('failure')
