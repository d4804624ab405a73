"""index trials for every sort order of a page, with and without a state filter

A page of 100 trials sorted by value, duration or finish time, or filtered by state, sorted the whole study
(74 ms at 100,000 trials on SQLite). Each order now reads one index range: (study, [state,] column, number),
which also serves the indexes they replace (study, state), (study, value) and (study, finished_at).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 20:30:00
"""

from __future__ import annotations

from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

NEW = {
    'ix_hp_trials_study_state_number': ['study_id', 'state', 'number'],
    'ix_hp_trials_study_value_number': ['study_id', 'value', 'number'],
    'ix_hp_trials_study_duration_number': ['study_id', 'duration_s', 'number'],
    'ix_hp_trials_study_finished_number': ['study_id', 'finished_at', 'number'],
    'ix_hp_trials_study_state_value_number': ['study_id', 'state', 'value', 'number'],
    'ix_hp_trials_study_state_duration_number': ['study_id', 'state', 'duration_s', 'number'],
    'ix_hp_trials_study_state_finished_number': ['study_id', 'state', 'finished_at', 'number'],
}
REPLACED = {
    'ix_hp_trials_study_state': ['study_id', 'state'],
    'ix_hp_trials_study_value': ['study_id', 'value'],
    'ix_hp_trials_study_finished': ['study_id', 'finished_at'],
}


def upgrade() -> None:
    with op.batch_alter_table('hp_trials', schema=None) as batch_op:
        for name, columns in NEW.items():
            batch_op.create_index(name, columns, unique=False)
        for name in REPLACED:
            batch_op.drop_index(name)


def downgrade() -> None:
    with op.batch_alter_table('hp_trials', schema=None) as batch_op:
        for name, columns in REPLACED.items():
            batch_op.create_index(name, columns, unique=False)
        for name in NEW:
            batch_op.drop_index(name)
