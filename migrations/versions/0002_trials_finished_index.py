"""index trials by study and finish time

The live event stream and the dashboard read the trials of a study that finished since a moment;
without this index each poll reads every trial row of the study.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 07:45:00
"""

from __future__ import annotations

from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hp_trials', schema=None) as batch_op:
        batch_op.create_index('ix_hp_trials_study_finished', ['study_id', 'finished_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('hp_trials', schema=None) as batch_op:
        batch_op.drop_index('ix_hp_trials_study_finished')
