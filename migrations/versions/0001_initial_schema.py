"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-23 07:21:20.287444
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hp_api_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('owner', sa.String(length=64), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hp_api_keys')),
    sa.UniqueConstraint('key_hash', name=op.f('uq_hp_api_keys_key_hash'))
    )
    with op.batch_alter_table('hp_api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hp_api_keys_owner'), ['owner'], unique=False)

    op.create_table('hp_datasets',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('owner', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('description', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hp_datasets')),
    sa.UniqueConstraint('owner', 'content_hash', name='uq_hp_datasets_owner_hash')
    )
    with op.batch_alter_table('hp_datasets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hp_datasets_owner'), ['owner'], unique=False)

    op.create_table('hp_studies',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('owner', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('optuna_name', sa.String(length=64), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.Column('n_trials', sa.Integer(), nullable=False),
    sa.Column('max_parallel', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('deadline_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('stop_reason', sa.String(length=32), nullable=True),
    sa.Column('stop_requested_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('test_metrics', sa.JSON(), nullable=True),
    sa.Column('finalize_worker', sa.String(length=128), nullable=True),
    sa.Column('finalize_until', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hp_studies')),
    sa.UniqueConstraint('optuna_name', name=op.f('uq_hp_studies_optuna_name')),
    sa.UniqueConstraint('owner', 'idempotency_key', name='uq_hp_studies_owner_idempotency')
    )
    with op.batch_alter_table('hp_studies', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hp_studies_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_hp_studies_owner'), ['owner'], unique=False)
        batch_op.create_index(batch_op.f('ix_hp_studies_status'), ['status'], unique=False)

    op.create_table('hp_workers',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('hostname', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('devices', sa.JSON(), nullable=False),
    sa.Column('slots', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('stopped_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hp_workers'))
    )
    with op.batch_alter_table('hp_workers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hp_workers_heartbeat_at'), ['heartbeat_at'], unique=False)

    op.create_table('hp_trials',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.String(length=32), nullable=False),
    sa.Column('number', sa.Integer(), nullable=True),
    sa.Column('optuna_trial_id', sa.Integer(), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('params', sa.JSON(), nullable=True),
    sa.Column('value', sa.Float(), nullable=True),
    sa.Column('values', sa.JSON(), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=True),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('worker_id', sa.String(length=128), nullable=True),
    sa.Column('device', sa.String(length=32), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('deadline_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('duration_s', sa.Float(), nullable=True),
    sa.Column('epochs_run', sa.Integer(), nullable=True),
    sa.Column('best_epoch', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('artifact', sa.String(length=500), nullable=True),
    sa.ForeignKeyConstraint(['study_id'], ['hp_studies.id'], name=op.f('fk_hp_trials_study_id_hp_studies'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hp_trials')),
    sa.UniqueConstraint('study_id', 'number', name='uq_hp_trials_study_number')
    )
    with op.batch_alter_table('hp_trials', schema=None) as batch_op:
        batch_op.create_index('ix_hp_trials_state_heartbeat', ['state', 'heartbeat_at'], unique=False)
        batch_op.create_index('ix_hp_trials_study_state', ['study_id', 'state'], unique=False)
        batch_op.create_index('ix_hp_trials_study_value', ['study_id', 'value'], unique=False)

    op.create_table('hp_trial_epochs',
    sa.Column('trial_id', sa.Integer(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.Column('train_loss', sa.Float(), nullable=True),
    sa.Column('val_loss', sa.Float(), nullable=True),
    sa.Column('val_metric', sa.Float(), nullable=True),
    sa.Column('learning_rate', sa.Float(), nullable=True),
    sa.Column('seconds', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['trial_id'], ['hp_trials.id'], name=op.f('fk_hp_trial_epochs_trial_id_hp_trials'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('trial_id', 'attempt', 'epoch', name=op.f('pk_hp_trial_epochs'))
    )


def downgrade() -> None:
    op.drop_table('hp_trial_epochs')
    with op.batch_alter_table('hp_trials', schema=None) as batch_op:
        batch_op.drop_index('ix_hp_trials_study_value')
        batch_op.drop_index('ix_hp_trials_study_state')
        batch_op.drop_index('ix_hp_trials_state_heartbeat')

    op.drop_table('hp_trials')
    with op.batch_alter_table('hp_workers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hp_workers_heartbeat_at'))

    op.drop_table('hp_workers')
    with op.batch_alter_table('hp_studies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hp_studies_status'))
        batch_op.drop_index(batch_op.f('ix_hp_studies_owner'))
        batch_op.drop_index(batch_op.f('ix_hp_studies_created_at'))

    op.drop_table('hp_studies')
    with op.batch_alter_table('hp_datasets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hp_datasets_owner'))

    op.drop_table('hp_datasets')
    with op.batch_alter_table('hp_api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hp_api_keys_owner'))

    op.drop_table('hp_api_keys')
